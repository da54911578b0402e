"""The data-path floor that scripts/benchmark-rounds.py prints beside both systems' rounds."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from federated_learning.protocol.tensors import digest_of, encode_layers

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


@pytest.fixture(scope="module")
def round_floor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("round_floor", SCRIPTS / "round_floor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("round_floor", module)
    spec.loader.exec_module(module)
    return module


def test_floor_rounds_are_timed_and_leave_nothing(round_floor: ModuleType, tmp_path: Path) -> None:
    folder = tmp_path / "floor"
    logged: list[str] = []
    # 69 agents of a 1,000-value model: some agents' steps are equal, so their uploads are equal bytes.
    floor = round_floor.measure_floor(agents=69, params=1000, layers=3, rounds=3, folder=folder, log=logged.append)
    assert len(floor["rounds"]) == 3 and len(logged) == 3
    assert 0 < floor["s_per_round"] <= max(floor["rounds"])
    assert floor["cpu_s_per_round"] >= 0 and floor["threads"] >= 1
    assert not folder.exists()


def test_a_changed_upload_is_refused(round_floor: ModuleType, tmp_path: Path) -> None:
    data = encode_layers({"w": np.ones(8, np.float32)})
    path = tmp_path / "upload"
    path.write_bytes(data)
    assert list(round_floor.read_checked(path, digest_of(data))) == ["w"]
    path.write_bytes(encode_layers({"w": np.zeros(8, np.float32)}))
    with pytest.raises(RuntimeError, match="does not hash to its name"):
        round_floor.read_checked(path, digest_of(data))
