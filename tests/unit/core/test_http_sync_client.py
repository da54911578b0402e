import datetime as dt
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from agents.http_sync import SyncFailed, SyncSettings, seconds_until, sync_once
from federated_learning.protocol.tensors import decode_layers, digest_of, encode_layers

MERGED = encode_layers({"w": np.ones(3, np.float32)})


def settings(tmp_path: Path, **env: str) -> SyncSettings:
    (tmp_path / "local.safetensors").write_bytes(encode_layers({"w": np.zeros(3, np.float32)}))
    return SyncSettings.from_environment({
        "ENABLE_FED_LEARNING": "true", "FED_SERVER_URL": "http://server", "FED_CLIENT_ID": "bot-1",
        "FED_LOCAL_MODEL_PATH": str(tmp_path / "local.safetensors"),
        "FED_MERGED_MODEL_PATH": str(tmp_path / "merged.safetensors"), "FED_API_KEY": "k" * 20, **env})


def test_settings_come_from_the_seed_environment_names(tmp_path: Path) -> None:
    s = settings(tmp_path, FED_SYNC_HOUR="4", FED_SYNC_MINUTE="30")
    assert (s.enabled, s.client_id, s.sync_hour, s.sync_minute) == (True, "bot-1", 4, 30)
    with pytest.raises(ValueError, match="FED_SYNC_HOUR is 25"):
        settings(tmp_path, FED_SYNC_HOUR="25")


def test_next_sync_is_today_or_tomorrow() -> None:
    now = dt.datetime(2026, 11, 26, 10, 0)
    assert seconds_until(11, 0, now) == 3600
    assert seconds_until(9, 0, now) == 23 * 3600


def test_server_down_is_retried_with_backoff_then_the_merged_model_is_written(tmp_path: Path) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, text="starting")
        return httpx.Response(200, content=MERGED, headers={"X-Model-SHA256": digest_of(MERGED)})

    sleeps: list[float] = []
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        path = sync_once(settings(tmp_path), client, sleep=sleeps.append)
    assert sleeps == [1.0, 2.0]
    assert calls[-1].headers["X-Client-Id"] == "bot-1"
    np.testing.assert_array_equal(decode_layers(path.read_bytes(), max_bytes=1 << 20)["w"], np.ones(3))


def test_refused_update_and_wrong_hash_fail_without_writing(tmp_path: Path) -> None:
    def refused(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(422, text="bad_shape")

    def tampered(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=MERGED, headers={"X-Model-SHA256": "0" * 64})

    for handler, message in ((refused, "refused"), (tampered, "does not match")):
        with httpx.Client(transport=httpx.MockTransport(handler)) as client, \
                pytest.raises(SyncFailed, match=message):
            sync_once(settings(tmp_path), client, sleep=lambda _s: None)
    assert not (tmp_path / "merged.safetensors").exists()


def test_the_next_sync_names_the_version_the_local_model_was_trained_from(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=MERGED, headers={
            "X-Model-SHA256": digest_of(MERGED), "X-Training-Id": "t1", "X-Model-Version": str(len(seen) + 6)})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        sync_once(settings(tmp_path), client)
        sync_once(settings(tmp_path), client)
        sync_once(settings(tmp_path, FED_TRAINING_ID="other"), client)
    assert "X-Base-Version" not in seen[0].headers  # nothing merged yet
    assert seen[1].headers["X-Base-Version"] == "7"
    assert "X-Base-Version" not in seen[2].headers  # the merged model is another training's


def test_metrics_beside_the_local_model_are_sent_as_headers(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=MERGED, headers={"X-Model-SHA256": digest_of(MERGED)})

    s = settings(tmp_path, FED_NUM_EXAMPLES="5")
    metrics = tmp_path / "local.safetensors.metrics.json"
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        sync_once(s, client)
        metrics.write_text(json.dumps({"accuracy": 0.75, "loss": 0.5, "num_examples": 40}))
        sync_once(s, client)
        metrics.write_text(json.dumps({"accuracy": 1.5, "loss": float("nan"), "num_examples": 0}))
        sync_once(s, client)
    assert "X-Accuracy" not in seen[0].headers and seen[0].headers["X-Num-Examples"] == "5"
    assert (seen[1].headers["X-Accuracy"], seen[1].headers["X-Loss"], seen[1].headers["X-Num-Examples"]) == \
        ("0.75", "0.5", "40")
    assert "X-Accuracy" not in seen[2].headers and "X-Loss" not in seen[2].headers  # out of range: left out
    assert seen[2].headers["X-Num-Examples"] == "5"
