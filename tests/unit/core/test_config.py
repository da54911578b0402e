import json
from pathlib import Path

import pytest

from federated_learning.config import ConfigError, load_settings


def write(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def test_config_file_values_are_read(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, cpu_cores=4, dashboard_port=9000))
    assert (settings.cpu_cores, settings.dashboard_port) == (4, 9000)


def test_environment_overrides_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FL_CPU_CORES", "6")
    assert load_settings(write(tmp_path, cpu_cores=4)).cpu_cores == 6


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config key 'cpu_corez' is unknown"):
        load_settings(write(tmp_path, cpu_corez=4))


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config 'dashboard_port' is 'eighty'"):
        load_settings(write(tmp_path, dashboard_port="eighty"))


def test_min_above_max_clients_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"min_clients_per_round \(30\) must not exceed max_clients_per_round \(20\)"):
        load_settings(write(tmp_path, min_clients_per_round=30, max_clients_per_round=20))


def test_impossible_core_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config 'cpu_cores' is 0"):
        load_settings(write(tmp_path, cpu_cores=0))


def test_invalid_json_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_settings(path)


def test_shipped_config_json_loads() -> None:
    settings = load_settings(Path(__file__).resolve().parents[3] / "config.json")
    assert settings.cpu_cores == 12
    assert settings.max_concurrent_trainings == 3
    assert settings.default_privacy_level == "medium"
    assert (settings.min_clients_per_round, settings.max_clients_per_round) == (3, 20)


def test_a_bucket_is_the_blob_store_with_its_endpoint(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, blob_bucket="fl-models", blob_endpoint_url="http://minio:9000",
                                   blob_region=""))
    assert (settings.blob_bucket, settings.blob_endpoint_url, settings.blob_region) == (
        "fl-models", "http://minio:9000", None)
    assert load_settings(write(tmp_path, blob_bucket="")).blob_bucket is None


@pytest.mark.parametrize(("values", "reason"), [
    ({"blob_bucket": "Fl_Models"}, "blob_bucket"),
    ({"blob_bucket": "fl-models", "blob_endpoint_url": "minio:9000"}, "blob_endpoint_url"),
    ({"blob_bucket": "fl-models", "blob_dir": "/srv/blobs"}, "one store"),
    ({"blob_endpoint_url": "http://minio:9000"}, "need blob_bucket"),
])
def test_a_bucket_setting_that_cannot_work_is_refused(tmp_path: Path, values: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_settings(write(tmp_path, **values))
