"""The user-model contract: ``as_trainer`` adapts what a factory returns, ``run_trainer`` checks
what the user's code gives back, and the runner loads factories and finds the bus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.app import (
    Config,
    FlowerTrainer,
    Metrics,
    Parameters,
    as_trainer,
    flower_layer_names,
    layout_of,
)
from agents.local_work import run_trainer, task_config
from agents.runner import RunnerError, build_trainer, bus_access, load_factory
from federated_learning.protocol.messages import Task, TaskKind
from federated_learning.protocol.tensors import InvalidTensor


class Named:
    def __init__(self, returned: dict[str, Any] | None = None, examples: Any = 10, loss: float = 0.5) -> None:
        self.params = {"w": np.zeros((2, 3), np.float32), "n": np.array(0, np.int64)}
        self.returned, self.examples, self.loss = returned, examples, loss
        self.configs: list[Config] = []

    def get_parameters(self, config: Config) -> Parameters:
        return self.params

    def fit(self, parameters: Parameters, config: Config) -> tuple[Parameters, int, Metrics]:
        self.configs.append(config)
        new = self.returned if self.returned is not None else {
            "w": parameters["w"] + 1, "n": parameters["n"] + 1}
        return new, self.examples, {"loss": 0.25, "accuracy": 0.75}

    def evaluate(self, parameters: Parameters, config: Config) -> tuple[float, int, Metrics]:
        return self.loss, 4, {"accuracy": 0.5}


class FlowerLike:
    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [np.zeros(3), np.ones(2)]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        return [p + 1 for p in parameters], 5, {}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        return 0.1, 2, {"accuracy": 1.0}


def task(kind: TaskKind = TaskKind.TRAIN) -> Task:
    return Task.model_validate({
        "kind": kind, "training_id": "t", "round": 3, "attempt": 1, "dataset": "d",
        "model": {"from_first_agent": True}, "model_digest": "0" * 64, "model_version": 2,
        "settings": {"epochs": 4, "batch_size": 8, "learning_rate": 0.05}, "deadline_at": 0.0})


def test_a_named_trainer_is_used_as_it_is_and_a_flower_client_is_wrapped() -> None:
    named = Named()
    assert as_trainer(named) is named
    wrapped = as_trainer(FlowerLike())
    assert isinstance(wrapped, FlowerTrainer)
    assert list(wrapped.get_parameters({})) == flower_layer_names(2) == ["param_000", "param_001"]


def test_an_object_without_the_methods_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="no fit"):
        as_trainer(type("Half", (), {"get_parameters": lambda self, c: {}})())


def test_the_trainer_gets_the_round_and_the_local_settings() -> None:
    named = Named()
    evaluation, result = run_trainer(named, task(), dict(named.params))
    assert named.configs == [task_config(task())]
    assert named.configs[0] == {"server_round": 3, "local_epochs": 4, "batch_size": 8, "learning_rate": 0.05,
                                "proximal_mu": 0.0, "training_id": "t"}
    assert evaluation.accuracy == 0.5 and evaluation.num_examples == 4
    assert result is not None and result.num_examples == 10 and result.accuracy == 0.75
    assert int(result.layers["n"]) == 1


def test_an_evaluate_task_does_not_train() -> None:
    named = Named()
    _evaluation, result = run_trainer(named, task(TaskKind.EVALUATE), dict(named.params))
    assert result is None and named.configs == []


@pytest.mark.parametrize(("returned", "message"), [
    ({"w": np.zeros((3, 2), np.float32), "n": np.array(0, np.int64)}, "layer 'w': expected (2, 3) float32, received (3, 2) float32"),
    ({"w": np.zeros((2, 3), np.float64), "n": np.array(0, np.int64)}, "layer 'w': expected (2, 3) float32, received (2, 3) float64"),
    ({"w": np.zeros((2, 3), np.float32)}, "layer 'n' (expected () int64) is missing"),
])
def test_a_fit_that_returns_another_layout_fails_with_the_layer_named(returned: dict[str, Any], message: str) -> None:
    named = Named(returned)
    with pytest.raises(InvalidTensor, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_trainer(named, task(), dict(named.params))


@pytest.mark.parametrize(("examples", "loss"), [(-1, 0.5), (0, 0.5), (2.5, 0.5), (10, float("nan"))])
def test_impossible_figures_from_the_trainer_fail_the_task(examples: Any, loss: float) -> None:
    named = Named(examples=examples, loss=loss)
    with pytest.raises(ValueError):
        run_trainer(named, task(), dict(named.params))


def test_the_flower_adapter_keeps_the_training_s_layer_names() -> None:
    trainer = FlowerTrainer(FlowerLike())  # type: ignore[arg-type]
    new, examples, _ = trainer.fit({"a": np.zeros(3), "b": np.ones(2)}, {})
    assert list(new) == ["a", "b"] and examples == 5
    assert layout_of(new) == {"a": ((3,), "float64"), "b": ((2,), "float64")}


def factory_with_id(agent_id: str) -> Named:
    named = Named()
    named.params["w"] = np.full((2, 3), len(agent_id), np.float32)
    return named


def factory_without_id() -> FlowerLike:
    return FlowerLike()


def test_the_runner_loads_factories_with_or_without_the_agent_id() -> None:
    trainer = build_trainer(load_factory(f"{__name__}:factory_with_id"), "agent-7")
    assert float(trainer.get_parameters({})["w"][0, 0]) == len("agent-7")
    assert isinstance(build_trainer(load_factory(f"{__name__}:factory_without_id"), "x"), FlowerTrainer)


@pytest.mark.parametrize("spec", ["no_colon", "no.such.module:make", f"{__name__}:missing"])
def test_a_bad_app_is_refused_with_what_to_change(spec: str) -> None:
    with pytest.raises(RunnerError):
        load_factory(spec)


def test_the_bus_comes_from_the_url_or_the_deployment_file(tmp_path: Path) -> None:
    assert bus_access(None, "redis://h:1", None, "a").redis_url == "redis://h:1"
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"redis_url": "redis://:pw@127.0.0.1:7000", "key_prefix": "px"}))
    access = bus_access(deployment, None, None, "a")
    assert access.redis_url == "redis://:pw@127.0.0.1:7000" and access.key_prefix == "px"
    with pytest.raises(RunnerError, match="cannot read the deployment file"):
        bus_access(tmp_path / "missing.json", None, None, "a")


def test_an_agent_of_an_acl_deployment_logs_in_as_itself_or_is_told_to_be_provisioned(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets" / "redis-acl"
    secrets.mkdir(parents=True)
    (secrets / "fl-agent-a1").write_text("a1-pass")
    deployment = tmp_path / "deployment.json"
    deployment.write_text(json.dumps({"redis_url": "redis://fl-services:svc-pass@127.0.0.1:7000/0",
                                      "redis_acl": True, "redis_acl_secrets": str(secrets)}))

    assert bus_access(deployment, None, None, "a1").redis_url == "redis://fl-agent-a1:a1-pass@127.0.0.1:7000/0"
    with pytest.raises(RunnerError, match="no password for Redis user 'fl-agent-a2'.*--provision-acl --agents a2"):
        bus_access(deployment, None, None, "a2")
