"""A Flower NumPyClient, unchanged, trains as an agent beside native agents."""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import redis.asyncio as aioredis

from agents.data import make_client_datasets
from agents.flower import FlowerAgent
from federated_learning.presets import create_trainer
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import VersionRecord
from tests.integration.conftest import digits_config, start_training, wait_for_status

if importlib.util.find_spec("flwr") is not None:  # the real base class when Flower is installed
    from flwr.client import NumPyClient as Base
else:
    Base = object

NAMES = ("dense.weight", "dense.bias")


class DigitsClient(Base):  # type: ignore[misc, valid-type]
    """What a Flower user already has: get_parameters / fit / evaluate over NumPy arrays."""

    def __init__(self, x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> None:
        self.trainer = create_trainer("softmax", num_features=64, num_classes=10)
        self.parameters = list(self.trainer.init_model(0).values())
        self.x, self.y, self.x_eval, self.y_eval = x, y, x_eval, y_eval
        self.fits = 0

    def get_parameters(self, config):  # type: ignore[no-untyped-def]
        return self.parameters

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        weights, result = self.trainer.train(dict(zip(NAMES, parameters)), self.x, self.y,
                                             epochs=int(config["local_epochs"]), batch_size=int(config["batch_size"]),
                                             learning_rate=float(config["learning_rate"]), seed=int(config["server_round"]))
        self.parameters = list(weights.values())
        self.fits += 1
        return self.parameters, len(self.y), {"loss": result.loss}

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        result = self.trainer.evaluate(dict(zip(NAMES, parameters)), self.x_eval, self.y_eval)
        return result.loss, result.num_examples, {"accuracy": result.accuracy}


async def test_flower_clients_and_native_agents_train_together(
        redis: aioredis.Redis, redis_url: str, system, make_agents) -> None:
    await system.start()
    await make_agents(3)
    data, _ = make_client_datasets(6, "iid", 2)
    flower = []
    for d in data[3:]:
        client = DigitsClient(d.train.x, d.train.y, d.eval.x, d.eval.y)
        agent = FlowerAgent(f"flower-{d.client_id}", client, dataset="digits", num_examples=len(d.train.y),
                            redis_url=redis_url, heartbeat_interval_s=0.2)
        await agent.initialize()
        flower.append(agent)
    try:
        await start_training(redis, "flwr", digits_config(rounds=3, clients_per_round=6, min_clients=6))
        state = await wait_for_status(redis, "flwr", {"completed", "failed"})
    finally:
        await asyncio.gather(*(a.close() for a in flower))

    assert state.status == "completed", state.reason
    records = [VersionRecord.model_validate_json(v) for v in (await redis.hgetall(Keys().versions("flwr"))).values()]
    assert {a.agent_id for a in flower} <= {c for r in records for c in r.contributors}
    assert all(a.numpy_client.fits == 3 for a in flower)
    assert state.final_evaluation is not None and state.final_evaluation.accuracy > 0.8
