"""A bot with its own model that speaks nothing but HTTP and JSON to the federated system.

Its model is its own layout (``{"dense": (64, 10), "bias": (10,)}``: softmax regression in
NumPy on its share of the digits); the bot needs no SDK, no Redis and no safetensors:

- ``GET /api/training/<id>/status``: the training's state, round, phase and current version;
- ``POST /sync_model`` with ``{"client_id", "training_id", "base_version", "weights": {layer:
  nested lists}, "metrics": {"num_examples", "accuracy", "loss"}}``: its locally trained model
  (the first one, before the training has any model, becomes version 0 and fixes the layout);
- ``GET /api/training/<id>/versions/<v>/model?format=json``: a global model as nested lists.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from numpy.typing import NDArray

FINAL = ("completed", "failed", "stopped")
POLL_S = 0.3


class Bot:
    def __init__(self, client_id: str, base_url: str, api_key: str, x: NDArray[np.float32],
                 y: NDArray[np.int64], x_eval: NDArray[np.float32], y_eval: NDArray[np.int64]) -> None:
        self.client_id, self.base_url, self.api_key = client_id, base_url.rstrip("/"), api_key
        self.x, self.y, self.x_eval, self.y_eval = x.astype(np.float64), y, x_eval.astype(np.float64), y_eval
        rng = np.random.default_rng(0)
        self.weights = {"dense": rng.normal(0, 0.01, (x.shape[1], 10)), "bias": np.zeros(10)}
        self.history: list[str] = []
        """One line per sync: what it sent and what the server answered."""
        self.registered = False
        """Whether a sync was taken (the gateway then knows the bot, and rounds count it)."""

    # -- HTTP ------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "X-API-Key": self.api_key, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def status(self, training_id: str) -> dict[str, Any] | None:
        code, body = self._request("GET", f"/api/training/{training_id}/status")
        return body if code == 200 else None

    def sync(self, training_id: str, base_version: int | None) -> int:
        loss, accuracy = self.evaluate(self.weights)
        code, answer = self._request("POST", "/sync_model", {
            "client_id": self.client_id, "training_id": training_id, "base_version": base_version,
            "weights": {name: layer.tolist() for name, layer in self.weights.items()},
            "metrics": {"num_examples": len(self.y), "accuracy": accuracy, "loss": loss}})
        self.history.append(f"base v{base_version}: {code} {answer.get('update') or answer.get('detail')}")
        self.registered = self.registered or code < 300
        return code

    def global_model(self, training_id: str, version: int) -> dict[str, NDArray[np.float64]]:
        code, body = self._request("GET", f"/api/training/{training_id}/versions/{version}/model?format=json")
        if code != 200:
            raise RuntimeError(f"model v{version}: {code} {body}")
        return {name: np.asarray(value, dtype=np.float64) for name, value in body["weights"].items()}

    # -- the bot's own model ------------------------------------------------------
    def _probabilities(self, weights: dict[str, NDArray[np.float64]], x: NDArray[np.float64]) -> NDArray[np.float64]:
        logits = x @ weights["dense"] + weights["bias"]
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return np.asarray(exp / exp.sum(axis=1, keepdims=True))

    def train(self, weights: dict[str, NDArray[np.float64]], epochs: int, learning_rate: float) -> None:
        dense, bias = weights["dense"].copy(), weights["bias"].copy()
        onehot = np.eye(10)[self.y]
        for _ in range(epochs):
            grad = self._probabilities({"dense": dense, "bias": bias}, self.x) - onehot
            dense -= learning_rate * self.x.T @ grad / len(self.y)
            bias -= learning_rate * grad.mean(axis=0)
        self.weights = {"dense": dense, "bias": bias}

    def evaluate(self, weights: dict[str, NDArray[np.float64]]) -> tuple[float, float]:
        p = self._probabilities(weights, self.x_eval)
        loss = float(-np.log(p[np.arange(len(self.y_eval)), self.y_eval] + 1e-12).mean())
        return loss, float((p.argmax(axis=1) == self.y_eval).mean())

    # -- the loop ------------------------------------------------------------------
    def follow(self, training_id: str, stop: threading.Event, *, epochs: int = 20, learning_rate: float = 1.0) -> None:
        """Until the training ends: offer the first model while it has none; then train each round's
        model once and sync it (a round retried or re-opened gets one more sync)."""
        last: tuple[Any, ...] | None = None
        while not stop.is_set():
            status = self.status(training_id)
            if status is None:
                time.sleep(POLL_S)
                continue
            if status["status"] in FINAL:
                return
            version = status.get("current_version")
            if status["status"] == "initializing" and not status["layers"] and not self.registered:
                self.sync(training_id, None)  # the training's first model, if no one was faster
            elif version is not None and status["status"] in ("running", "paused"):
                key = (version, status["round"], status["attempt"], status["phase"] == "collecting")
                # Registered (first sync) while paused; afterwards once per collecting round.
                if key != last and (status["phase"] == "collecting" or not self.registered):
                    self.train(self.global_model(training_id, version), epochs, learning_rate)
                    if self.sync(training_id, version) < 300:
                        last = key
            time.sleep(POLL_S)
