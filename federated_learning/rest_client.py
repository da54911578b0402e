"""The dashboard's REST API from Python: upload your model, start a training, follow it, download it.

    from federated_learning.rest_client import RestClient
    api = RestClient("http://127.0.0.1:8080", api_key)
    model = api.upload_model("model.safetensors")               # or a dict of name -> numpy array
    training_id = api.start_training({"dataset": "digits", "rounds": 10}, model_id=model["model_id"])
    status = api.wait(training_id)
    layers = api.download_model(training_id, status["current_version"])

The same from the shell: ``python -m federated_learning.rest_client start --initial-model
model.safetensors --dataset digits --rounds 10`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from federated_learning.protocol.tensors import decode_layers, encode_layers
from federated_learning.types import NamedLayers

FINAL_STATUSES = frozenset({"completed", "failed", "stopped"})
POLL_S = 0.5
MAX_DOWNLOAD_BYTES = 1 << 34


class ApiError(RuntimeError):
    """The dashboard refused a request; the message is its reason."""


class RestClient:
    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = 30.0,
                 verify: Any = True) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, headers={"X-API-Key": api_key},
                                 verify=verify)

    def close(self) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(f"{response.request.method} {response.request.url.path}: {response.status_code} {detail}")
        return response.json() if response.headers.get("content-type", "").startswith("application/json") \
            else response.content

    def upload_model(self, model: Path | str | bytes | Mapping[str, np.ndarray], *, name: str = "") -> dict[str, Any]:
        """Upload a model (a safetensors file, its bytes, or named arrays); returns its record
        (``model_id``, ``layers``, ``parameters``, ...)."""
        if isinstance(model, (str, Path)):
            data = Path(model).read_bytes()
        elif isinstance(model, bytes):
            data = model
        else:
            data = encode_layers({key: np.asarray(value) for key, value in model.items()})
        headers = {"Content-Type": "application/octet-stream", **({"X-Model-Name": name} if name else {})}
        return dict(self._check(self.http.post("/api/models", content=data, headers=headers)))

    def start_training(self, config: Mapping[str, Any], *, model_id: str | None = None,
                       from_first_agent: bool = False, training_id: str | None = None) -> str:
        """Start a training (``config`` is the body of ``POST /api/training/start``); ``model_id``
        or ``from_first_agent`` set its model. Returns the training id."""
        body = dict(config)
        if model_id is not None:
            body["model"] = {"model_id": model_id}
        elif from_first_agent:
            body["model"] = {"from_first_agent": True}
        if training_id is not None:
            body["training_id"] = training_id
        return str(self._check(self.http.post("/api/training/start", json=body))["training_id"])

    def status(self, training_id: str) -> dict[str, Any] | None:
        """The training's status, or None while the coordinator has not taken it yet."""
        response = self.http.get(f"/api/training/{training_id}/status")
        return None if response.status_code == 404 else dict(self._check(response))

    def metrics(self, training_id: str) -> list[dict[str, Any]]:
        return list(self._check(self.http.get(f"/api/training/{training_id}/metrics")))

    def wait(self, training_id: str, *, timeout_s: float = 3600.0) -> dict[str, Any]:
        """Poll until the training is completed, failed or stopped; its last status."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(training_id)
            if status is not None and status["status"] in FINAL_STATUSES:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"training {training_id} still {status and status['status']} after {timeout_s}s")
            time.sleep(POLL_S)

    def download_model(self, training_id: str, version: int) -> NamedLayers:
        data = self._check(self.http.get(f"/api/training/{training_id}/versions/{version}/model"))
        return decode_layers(bytes(data), max_bytes=MAX_DOWNLOAD_BYTES)


def memory_bank_model(feature_dim: int, **settings: Any) -> dict[str, Any]:
    """The ``model`` of a memory-bank training's body: ``feature_dim`` and any of
    ``global_bank_size``, ``aggregation_strategy``, ``weighted``, ``local_coreset_fraction``,
    ``max_rows_per_agent``, ``seed`` (see docs/memory-banks.md)."""
    return {"kind": "memory_bank", "feature_dim": feature_dim, **settings}


def _deployment() -> dict[str, Any]:
    path = Path(os.environ.get("FL_DEPLOYMENT", "data/run/deployment.json"))
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    deployment = _deployment()
    p = argparse.ArgumentParser(prog="python -m federated_learning.rest_client",
                                description="Upload models and start trainings over the dashboard's REST API.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=deployment.get("dashboard_url", "http://127.0.0.1:8080"),
                   help="dashboard URL (default: data/run/deployment.json's)")
    p.add_argument("--api-key", default=os.environ.get("FL_API_KEY", deployment.get("api_key", "")),
                   help="API key (default: $FL_API_KEY, else the deployment file's); write --api-key=KEY "
                        "when the key starts with '-'")
    sub = p.add_subparsers(dest="command", required=True)
    upload = sub.add_parser("upload-model", help="upload a safetensors model; prints its record")
    upload.add_argument("file", type=Path)
    upload.add_argument("--name", default="")
    start = sub.add_parser("start", help="start a training; prints its id",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    start.add_argument("--initial-model", type=Path, default=None, help="a safetensors file: version 0")
    start.add_argument("--from-first-agent", action="store_true", help="the first agent's model is version 0")
    start.add_argument("--memory-bank-dim", type=int, default=None, metavar="D",
                       help="a memory-bank training of D-wide feature rows (docs/memory-banks.md)")
    start.add_argument("--bank-size", type=int, default=10_000, help="memory banks: most rows of the global bank")
    start.add_argument("--bank-strategy", choices=("coreset", "random"), default="coreset",
                       help="memory banks: how the global bank's rows are picked")
    start.add_argument("--unweighted", action="store_true",
                       help="memory banks: one pool of rows instead of shares by example counts")
    start.add_argument("--local-coreset-fraction", type=float, default=0.1,
                       help="memory banks: share of its features each agent keeps before uploading")
    start.add_argument("--config", type=Path, default=None, help="JSON body of the training (see docs)")
    start.add_argument("--dataset", default=None, help="dataset the agents announce")
    start.add_argument("--rounds", type=int, default=None)
    start.add_argument("--algorithm", default=None)
    start.add_argument("--training-id", default=None)
    start.add_argument("--wait", action="store_true", help="wait for the end and print the final status")
    status = sub.add_parser("status", help="print a training's status")
    status.add_argument("training_id")
    args = p.parse_args(argv)
    api = RestClient(args.url, args.api_key)
    try:
        if args.command == "upload-model":
            print(json.dumps(api.upload_model(args.file, name=args.name), indent=1))
        elif args.command == "status":
            print(json.dumps(api.status(args.training_id), indent=1))
        else:
            body: dict[str, Any] = json.loads(args.config.read_text()) if args.config else {}
            body.update({key: value for key, value in (("dataset", args.dataset), ("rounds", args.rounds),
                                                       ("algorithm", args.algorithm)) if value is not None})
            if args.memory_bank_dim is not None:
                body["model"] = memory_bank_model(
                    args.memory_bank_dim, global_bank_size=args.bank_size, aggregation_strategy=args.bank_strategy,
                    weighted=not args.unweighted, local_coreset_fraction=args.local_coreset_fraction)
            model_id = api.upload_model(args.initial_model)["model_id"] if args.initial_model else None
            training_id = api.start_training(body, model_id=model_id, from_first_agent=args.from_first_agent,
                                             training_id=args.training_id)
            print(training_id, flush=True)
            if args.wait:
                print(json.dumps(api.wait(training_id), indent=1))
    except (ApiError, OSError, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
