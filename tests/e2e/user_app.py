"""A user's app for the runner tests: agent ``<id>-<k>`` trains the NumPy softmax model of
``tests.integration.test_user_models`` (float32 weight, float64 bias, int64 step counter) on
shard ``k`` of three."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from agents.data import make_client_datasets
from tests.integration import test_user_models as user_models

SHARDS = 3


def make(agent_id: str) -> user_models.SoftmaxTrainer:
    shard = make_client_datasets(SHARDS, "iid", 0)[0][int(agent_id.rsplit("-", 1)[-1]) % SHARDS]
    return user_models.SoftmaxTrainer(shard.train.x, shard.train.y, shard.eval.x, shard.eval.y)


def make_half(agent_id: str) -> user_models.SoftmaxTrainer:
    """The same model in float16 (weight) and bfloat16 (bias)."""
    trainer = make(agent_id)
    trainer.params = {"dense.weight": trainer.params["dense.weight"].astype(np.float16),
                      "dense.bias": trainer.params["dense.bias"].astype(ml_dtypes.bfloat16),
                      "steps": trainer.params["steps"]}
    return trainer


def make_narrow(agent_id: str) -> user_models.SoftmaxTrainer:
    """Another layout: a (32, 10) weight."""
    shard = make_client_datasets(SHARDS, "iid", 0)[0][0]
    return user_models.SoftmaxTrainer(shard.train.x, shard.train.y, shard.eval.x, shard.eval.y, features=32)
