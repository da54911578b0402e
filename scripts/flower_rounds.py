"""Flower's side of ``scripts/benchmark-rounds.py``: one process of the baseline, timed.

``python scripts/flower_rounds.py server SPEC`` runs Flower's legacy gRPC server
(``flwr.server.start_server``) with FedAvg over the synthetic model of ``agents/synthetic.py``,
noting when each round's clients were sampled and when its aggregate was done;
``python scripts/flower_rounds.py clients SPEC`` runs ``SPEC["ids"]`` ``NumPyClient``s of that
model, one thread each. SPEC is a JSON object; the last stdout line is the process's JSON
result, with its peak RSS (VmHWM) and CPU seconds.

It imports Flower, NumPy and the synthetic model only, so that its memory is Flower's, not the
benchmark's.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flwr.client
import flwr.common
import flwr.server
import psutil
from flwr.server.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.synthetic import SyntheticTrainer, initial_model

CONNECT_WAIT_S = 60.0
"""How long a client keeps trying to reach the server."""


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round's clients were sampled and when its aggregate was done."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.opened: dict[int, float] = {}
        self.committed: dict[int, float] = {}
        self.cpu_s: dict[int, float] = {}
        """This process's CPU seconds when each round's aggregate was done."""

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.opened[server_round] = time.time()
        return instructions

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        aggregated = super().aggregate_fit(server_round, results, failures)
        self.committed[server_round] = time.time()
        self.cpu_s[server_round] = cpu_seconds()
        return aggregated


class SyntheticClient(flwr.client.NumPyClient):
    """The synthetic model of ``agents/synthetic.py`` as a Flower client (layers by position).

    ``rounds_cpu_s`` (shared by the process's clients): the process's CPU seconds at the first
    fit of each round."""

    def __init__(self, agent_id: str, params: int, layers: int, rounds_cpu_s: dict[int, float]) -> None:
        self.trainer = SyntheticTrainer(agent_id, params, layers)
        self.rounds_cpu_s = rounds_cpu_s

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        return list(self.trainer.params.values())

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict[str, Any]]:
        if int(config["server_round"]) not in self.rounds_cpu_s:
            self.rounds_cpu_s.setdefault(int(config["server_round"]), cpu_seconds())
        layers, count, _ = self.trainer.fit(dict(zip(self.trainer.params, parameters, strict=True)), config)
        return list(layers.values()), count, {}

    def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        return 0.0, self.trainer.num_examples, {}


def cpu_seconds() -> float:
    cpu = psutil.Process().cpu_times()
    return float(cpu.user + cpu.system)


def usage(rounds_cpu_s: dict[int, float]) -> dict[str, Any]:
    """This process's peak RSS (VmHWM, bytes), CPU seconds so far, and CPU seconds per round:
    between the marks of round 2 (1 for the server) and the last round, over their count."""
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    first, last = min(rounds_cpu_s, default=0), max(rounds_cpu_s, default=0)
    per_round = (rounds_cpu_s[last] - rounds_cpu_s[first]) / (last - first) if last > first else None
    return {"peak_rss_bytes": peak, "cpu_s": cpu_seconds(), "cpu_s_per_round": per_round}


def serve(spec: dict[str, Any]) -> dict[str, Any]:
    """Every round asks all ``spec["clients"]`` clients to fit; no evaluate rounds (our agents
    evaluate inside the train task, with no transfer of their own)."""
    n = spec["clients"]
    strategy = TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
        min_available_clients=n, on_fit_config_fn=lambda r: {"server_round": r},
        initial_parameters=flwr.common.ndarrays_to_parameters(
            list(initial_model(spec["params"], spec["layers"]).values())))
    flwr.server.start_server(server_address=spec["address"], strategy=strategy,
                             config=flwr.server.ServerConfig(num_rounds=spec["rounds"]))
    return {"opened": strategy.opened, "committed": strategy.committed, **usage(strategy.cpu_s)}


def run_clients(spec: dict[str, Any]) -> dict[str, Any]:
    rounds_cpu_s: dict[int, float] = {}

    def run(agent_id: str) -> None:
        client = SyntheticClient(agent_id, spec["params"], spec["layers"], rounds_cpu_s).to_client()
        flwr.client.start_client(server_address=spec["address"], client=client, insecure=True,
                                 transport="grpc-bidi", max_wait_time=CONNECT_WAIT_S)

    threads = [threading.Thread(target=run, args=(agent_id,)) for agent_id in spec["ids"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return usage({r: cpu for r, cpu in rounds_cpu_s.items() if r >= 2})


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("server", "clients"):
        sys.stderr.write("usage: flower_rounds.py server|clients SPEC_JSON\n")
        return 2
    spec = json.loads(argv[1])
    result = serve(spec) if argv[0] == "server" else run_clients(spec)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
