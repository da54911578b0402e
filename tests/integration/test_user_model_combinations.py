"""A user's model of mixed dtypes (float32 weight, float64 bias, int64 step counter), uploaded
over REST, under each setting that changes how updates are made or combined: secure aggregation,
central and local DP, compression, the robust rules, FedSGD and FedBuff.

Each training completes with every layer in its own dtype and the counter as documented (the
maximum of the accepted updates in plain rounds; the global model's under DP, secure aggregation
and compression), and learns where the setting lets it; or it is refused at start with its reason.
Each agent reports ``k`` more steps than it took (agent k of the test), so the maximum is not
also the mean, or the one update Krum picks. Agents and the REST client are those of
``test_user_models`` (its ``SoftmaxTrainer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from numpy.typing import NDArray

from agents.client import FederatedClient
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import AggregationJob, RoundMetrics, VersionRecord
from federated_learning.protocol.tensors import decode_layers, encode_layers
from federated_learning.protocol.updates import is_compressed
from tests.integration import test_user_models as user_models
from tests.integration.conftest import System, wait_for_status

http = user_models.http
user_agents = user_models.user_agents

DTYPES = {"dense.weight": "float32", "dense.bias": "float64", "steps": "int64"}
INITIAL_STEPS = 7
"""The uploaded model's counter: not zero, so that 'kept the global model's value' shows."""


async def upload(client: httpx.AsyncClient) -> str:
    initial = {"dense.weight": np.zeros((64, 10), np.float32), "dense.bias": np.zeros(10, np.float64),
               "steps": np.array(INITIAL_STEPS, np.int64)}
    response = await client.post("/api/models", content=encode_layers(initial),
                                 headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    return str(response.json()["model_id"])


def count_unevenly(agents: list[FederatedClient]) -> dict[str, int]:
    """Agent k reports k steps more than it took; returns agent id -> k."""
    extra = {}
    for k, agent in enumerate(agents):
        trainer = agent.trainer
        assert trainer is not None
        fit = trainer.fit

        def uneven(parameters: Any, config: Any, *, _fit: Any = fit, _k: int = k) -> Any:
            layers, examples, metrics = _fit(parameters, config)
            return {**layers, "steps": np.array(int(layers["steps"]) + _k, np.int64)}, examples, metrics

        trainer.fit = uneven  # type: ignore[method-assign]
        extra[agent.agent_id] = k
    return extra


ROGUE_STEPS = 10**6


def upload_a_counter_anyway(agent: FederatedClient) -> None:
    """The agent's dense uploads carry a huge counter, as from an agent that does not reset it."""
    put = agent.blobs.put

    async def put_with_counter(data: bytes, **options: Any) -> str:
        if not is_compressed(data):
            layers = decode_layers(data, max_bytes=1 << 24)
            if "steps" in layers:
                data = encode_layers({**layers, "steps": np.array(ROGUE_STEPS, np.int64)})
        return await put(data, **options)

    agent.blobs.put = put_with_counter  # type: ignore[method-assign]


async def versions_of(redis: aioredis.Redis, training_id: str
                      ) -> tuple[dict[int, VersionRecord], dict[int, dict[str, NDArray[Any]]]]:
    """Each committed version's record and model."""
    records = {r.version: r for r in (VersionRecord.model_validate_json(raw)
                                      for raw in (await redis.hgetall(Keys().versions(training_id))).values())}
    return records, {v: await user_models.final_model(redis, r.model_digest) for v, r in records.items()}


async def last_jobs(redis: aioredis.Redis, training_id: str) -> dict[int, AggregationJob]:
    """The last aggregation job of each round (the attempt that committed)."""
    jobs = [AggregationJob.model_validate_json(fields[b"m"]) for _id, fields in await redis.xrange(Keys().job_stream)]
    return {job.round: job for job in jobs if job.training_id == training_id}


@dataclass(frozen=True)
class Case:
    agents: int
    body: dict[str, Any]
    counter: Literal["maximum", "global"]
    """maximum: each version's counter is the maximum of its accepted updates'; global: unchanged."""
    min_accuracy: float | None
    """Test accuracy the final model reaches (chance is 0.1); None: no claim (noise may drown it)."""
    mechanism: str = "none"
    """The privacy mechanism each released version records."""
    local: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    rogue: bool = False
    """Agent 0 uploads a counter though the setting says not to: the server must ignore it."""


CENTRAL_DP = {"privacy_level": "low", "privacy_mode": "central", "noise_mechanism": "gaussian"}
LOCAL_DP = {"privacy_level": "low", "privacy_mode": "local", "noise_mechanism": "gaussian"}
SECURE = {"secure_aggregation": True}

COMPLETING = {
    # Plain rounds: every update whole and unclipped, the counter is their maximum.
    "krum": Case(5, {"algorithm": "krum", "algorithm_params": {"num_malicious_clients": 1}}, "maximum", 0.75),
    "multikrum": Case(5, {"algorithm": "multikrum", "algorithm_params": {"num_malicious_clients": 1}},
                      "maximum", 0.8),
    "trimmed_mean": Case(5, {"algorithm": "trimmed_mean", "algorithm_params": {"beta": 0.2}}, "maximum", 0.8),
    "median": Case(3, {"algorithm": "median"}, "maximum", 0.8),
    "bulyan": Case(7, {"algorithm": "bulyan", "algorithm_params": {"num_malicious_clients": 1}}, "maximum", 0.75),
    "fedsgd": Case(3, {"algorithm": "fedsgd", "algorithm_params": {"server_learning_rate": 1.0}}, "maximum",
                   0.7, epochs=1),
    "fedbuff": Case(4, {"algorithm": "fedbuff", "algorithm_params": {"buffer_size": 2}, "rounds": 3,
                        "clients_per_round": 4, "min_clients": 2}, "maximum", 0.7),
    # Secure aggregation: only the float mean is unmasked; the counter stays the global model's.
    "secure-fedavg": Case(4, {**SECURE}, "global", 0.8),
    "secure-fedsgd": Case(4, {**SECURE, "algorithm": "fedsgd"}, "global", 0.7, epochs=1),
    "secure-central-dp": Case(4, {**SECURE, **CENTRAL_DP}, "global", None, mechanism="gaussian"),
    # Differential privacy: updates are their clipped (and noised) float part.
    "central-dp-fedavg": Case(3, {**CENTRAL_DP}, "global", None, mechanism="gaussian", rogue=True),
    "local-dp-fedavg": Case(3, {**LOCAL_DP}, "global", None, mechanism="gaussian-local"),
    "local-dp-median": Case(3, {**LOCAL_DP, "algorithm": "median"}, "global", None, mechanism="gaussian-local"),
    # Compression: the upload is a compressed float delta.
    "q8-fedavg": Case(3, {}, "global", 0.8, local={"compression": "q8"}),
    "top_k-fedavg": Case(3, {}, "global", 0.8, local={"compression": "top_k", "compression_fraction": 0.2}),
    "q8-krum": Case(5, {"algorithm": "krum", "algorithm_params": {"num_malicious_clients": 1}}, "global", 0.75,
                    local={"compression": "q8"}),
    "top_k-fedbuff": Case(4, {"algorithm": "fedbuff", "algorithm_params": {"buffer_size": 2}, "rounds": 3,
                              "clients_per_round": 4, "min_clients": 2}, "global", 0.7,
                          local={"compression": "top_k", "compression_fraction": 0.2}),
}


def body_for(model_id: str, case: Case) -> dict[str, Any]:
    overrides = {"rounds": 2, "clients_per_round": case.agents, "min_clients": case.agents, **case.body}
    return user_models.training_body({"model_id": model_id}, **overrides, local={
        "epochs": case.epochs, "batch_size": 8, "learning_rate": 0.1, **case.local})


@pytest.mark.parametrize("name", list(COMPLETING))
async def test_a_mixed_dtype_user_model_trains_under_the_setting(
        name: str, system: System, http: httpx.AsyncClient, redis: aioredis.Redis, user_agents: Any) -> None:
    case = COMPLETING[name]
    await system.start()
    model_id = await upload(http)
    agents, test = await user_agents(case.agents)
    extra = count_unevenly(agents)
    if case.rogue:
        upload_a_counter_anyway(agents[0])
    started = await http.post("/api/training/start", json={**body_for(model_id, case), "training_id": name})
    assert started.status_code == 202, started.text

    state = await wait_for_status(redis, name, {"completed", "failed"}, timeout_s=60)

    assert state.status.value == "completed", state.reason
    records, versions = await versions_of(redis, name)
    rounds = case.body.get("rounds", 2)
    assert sorted(versions) == list(range(rounds + 1))
    for model in versions.values():
        assert {layer: array.dtype.name for layer, array in model.items()} == DTYPES
    assert {records[v].privacy.mechanism for v in range(1, rounds + 1)} == {case.mechanism}
    # What the aggregator was told: masked updates (secure), or updates to clip (central DP).
    jobs = await last_jobs(redis, name)
    secure = bool(case.body.get("secure_aggregation"))
    assert all((job.secure is not None) == secure for job in jobs.values())
    assert all((job.clip_norm is not None) == (case.mechanism == "gaussian" and not secure) for job in jobs.values())
    if case.local.get("compression"):  # the uploads were compressed deltas
        metrics = [RoundMetrics.model_validate_json(m) for m in await redis.lrange(Keys().training_metrics(name), 0, -1)]
        assert metrics and all(0 < m.upload_bytes < m.dense_bytes for m in metrics)
    if case.counter == "global":
        assert [int(versions[v]["steps"]) for v in sorted(versions)] == [INITIAL_STEPS] * (rounds + 1)
    else:
        for version in range(1, rounds + 1):
            job = jobs[version]
            assert job.base_version == version - 1
            # Each update: the counter of the job's base (a stale update is moved onto it, its
            # counter too), the local steps, and k.
            expected = max(int(versions[job.base_version]["steps"]) + case.epochs + extra[ref.agent_id]
                           for ref in job.updates)
            assert int(versions[version]["steps"]) == expected, (version, [r.agent_id for r in job.updates])
    assert state.current_digest is not None
    final = await user_models.final_model(redis, state.current_digest)
    assert np.all(np.isfinite(final["dense.weight"])) and np.all(np.isfinite(final["dense.bias"]))
    if case.min_accuracy is not None:
        assert user_models.accuracy_on(test.x, test.y, final) >= case.min_accuracy


REFUSED_BY_THE_API = {
    "secure-krum": ({**SECURE, "algorithm": "krum"},
                    "secure aggregation reveals only the weighted mean of the updates; algorithm 'krum'"),
    "secure-median": ({**SECURE, "algorithm": "median"}, "algorithm 'median' needs more and is refused"),
    "secure-fedbuff": ({**SECURE, "algorithm": "fedbuff"}, "algorithm 'fedbuff' needs more and is refused"),
    "secure-q8": ({**SECURE, "local": {"compression": "q8"}}, "compression is refused with it"),
    "secure-local-dp": ({**SECURE, **LOCAL_DP}, "use privacy_mode 'central' with secure aggregation"),
    "local-dp-top_k": ({**LOCAL_DP, "local": {"compression": "top_k"}}, "local DP needs uncompressed updates"),
}


@pytest.mark.parametrize("name", list(REFUSED_BY_THE_API))
async def test_a_setting_that_cannot_hold_is_refused_by_the_api_with_its_reason(
        name: str, http: httpx.AsyncClient) -> None:
    overrides, reason = REFUSED_BY_THE_API[name]
    model_id = await upload(http)
    response = await http.post("/api/training/start", json={
        **user_models.training_body({"model_id": model_id}, **overrides), "training_id": name})
    assert response.status_code == 422, response.text
    assert reason in response.text
    assert (await http.get(f"/api/training/{name}/status")).status_code == 404


@pytest.mark.parametrize("algorithm", ["krum", "median", "fedbuff", "fedsgd"])
async def test_central_dp_with_a_rule_other_than_the_mean_fails_at_start_with_its_reason(
        algorithm: str, system: System, http: httpx.AsyncClient, redis: aioredis.Redis) -> None:
    await system.start("coordinator")
    model_id = await upload(http)
    training_id = f"central-dp-{algorithm}"
    started = await http.post("/api/training/start", json={
        **user_models.training_body({"model_id": model_id}, **CENTRAL_DP, algorithm=algorithm,
                                    min_clients=5, clients_per_round=5), "training_id": training_id})
    assert started.status_code == 202, started.text
    state = await wait_for_status(redis, training_id, {"failed", "initializing", "running"})
    assert state.status.value == "failed"
    assert (f"central differential privacy is calibrated for the example-weighted mean; algorithm "
            f"'{algorithm}' is refused with privacy level 'low'") in state.reason
    assert state.current_version is None  # nothing was trained
