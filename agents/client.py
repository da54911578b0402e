"""The agent runtime: join, heartbeat, take tasks, evaluate, train, upload, leave.

An agent's data never leaves it: only the trained model (an update blob) and a small
notice with counts and metrics go on the bus. Many agents may share one process
(asyncio), each with its own identity, inbox and connection-level state.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import redis.asyncio as aioredis
from numpy.typing import NDArray
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agents.app import FlowerTrainer, MemoryBankTrainer, Trainer, layout_of
from agents.attacks import Attack, poison_update
from agents.local_work import LocalResult, local_bank, run_trainer, task_config
from agents.secure import SecureParticipation
from agents.shared_models import SharedModels
from agents.updates import TrainedUpdate
from federated_learning.bus.blob_stores import BlobStoreUnreachable, agent_blob_store
from federated_learning.bus.blobs import BlobMissing, BlobStore, BlobStoreError
from federated_learning.bus.connection import RedisTls, keys_for
from federated_learning.bus.consumer import ensure_group
from federated_learning.bus.replies import group_batches
from federated_learning.bus.stream_ids import append
from federated_learning.presets import trainer_for
from federated_learning.privacy.compression import (
    Compressor,
    ErrorFeedback,
    Quantizer,
    keep_count,
    random_k,
    top_k,
)
from federated_learning.privacy.mechanisms import (
    add_gaussian_noise,
    add_laplace_noise,
    clip_update_with_norm,
    secure_rng,
)
from federated_learning.privacy.signing import AgentKeyPair
from federated_learning.protocol.keys import GROUP_AGENT, Keys
from federated_learning.protocol.messages import (
    BANK_LAYER,
    AgentJoined,
    AgentLeft,
    Evaluation,
    Heartbeat,
    MalformedMessage,
    MemoryBankModel,
    ModelRefused,
    PresetModel,
    SignedByAgent,
    Task,
    TaskKind,
    UpdateSubmitted,
    decode,
    encode,
)
from federated_learning.protocol.secure_messages import SECURE_INBOX_TYPES, message_type
from federated_learning.protocol.tensors import (
    InvalidTensor,
    decode_layers,
    encode_layers,
    is_float,
    layout_mismatch,
    spec_of,
    validate_layers,
)
from federated_learning.protocol.updates import encode_compressed
from federated_learning.types import BlobDigest, NamedLayers

log = logging.getLogger(__name__)
SignedMessage = TypeVar("SignedMessage", bound=SignedByAgent)

UPDATE_BLOB_TTL_S = 24 * 3600
RECONNECT_BACKOFF_CAP_S = 10.0
LEAVE_RETRY_S = 5.0
REJOIN_INTERVAL_S = 300.0
"""How often the heartbeat loop re-sends the join (see FederatedClient.beat)."""
DEFAULT_MAX_BLOB_BYTES = 256 * 1024 * 1024


@dataclass
class LocalDataset:
    """One dataset an agent holds, split into local training and held-out evaluation parts."""

    x_train: NDArray[np.floating]
    y_train: NDArray[np.integer]
    x_eval: NDArray[np.floating]
    y_eval: NDArray[np.integer]

    @property
    def size(self) -> int:
        return len(self.y_train)


def make_compressor(method: str, fraction: float, rng: np.random.Generator) -> Compressor:
    """The compressor a task's settings name: top_k/random_k keep ``fraction`` of the coordinates."""
    if method == "top_k":
        return lambda layers: top_k(layers, keep_count(sum(int(a.size) for a in layers), fraction))
    if method == "random_k":
        return lambda layers: random_k(layers, keep_count(sum(int(a.size) for a in layers), fraction), rng)
    bits = {"q8": 8, "q4": 4}.get(method)
    if bits is None:
        raise ValueError(f"unknown compression '{method}'")
    return Quantizer(bits, rng)


class FederatedClient:
    """One agent. ``await initialize()`` joins and starts working; ``await close()`` leaves."""

    def __init__(
        self,
        agent_id: str,
        *,
        redis_url: str | None = None,
        redis: aioredis.Redis | None = None,
        key_prefix: str = "fl",
        heartbeat_interval_s: float = 30.0,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        seed: int = 0,
        attack: Attack | None = None,
        state_dir: Path | None = None,
        join_token: str | None = None,
        redis_tls: RedisTls | None = None,
        trainer: Trainer | MemoryBankTrainer | None = None,
        dataset: str | None = None,
        num_examples: int | None = None,
        blob_folder: Path | None = None,
        blob_endpoint_url: str | None = None,
        shared_models: SharedModels | None = None,
    ) -> None:
        if redis is None and redis_url is None:
            raise ValueError("FederatedClient needs redis_url or redis")
        if trainer is not None and (dataset is None or num_examples is None or num_examples <= 0):
            raise ValueError("an agent with its own trainer needs dataset and num_examples > 0 "
                             "(what it announces when it joins)")
        self.trainer = trainer
        """The user's model (``agents.app.Trainer``) or feature extractor (``MemoryBankTrainer``);
        None: the built-in preset the task names."""
        self._app_dataset = {dataset: int(num_examples)} if trainer is not None and dataset and num_examples else {}
        self.agent_id = agent_id
        self._redis_url = redis_url
        self._redis_tls = redis_tls
        """CA and client certificate for a ``rediss://`` URL; the URL's user and password log in."""
        self._redis = redis
        self._owns_redis = redis is None
        self.keys = Keys(key_prefix)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_blob_bytes = max_blob_bytes
        self.blob_folder = blob_folder
        """The deployment's ``blob_dir`` as mounted here, when it keeps blobs as files
        (``bus/blob_stores.py``) and the services see it at another path."""
        self.blob_endpoint_url = blob_endpoint_url
        """The deployment's object store as reached from here, when it keeps blobs in a bucket and
        the services reach it at another URL (credentials: the standard AWS chain)."""
        self.shared_models = shared_models
        """Models this agent shares with the other agents of its process (each read once)."""
        self._blob_store_published = False
        self._blobs: BlobStore | None = None
        self.seed = seed
        self.join_token = join_token
        self.attack = attack
        """Set only in robustness experiments: this agent then uploads poisoned updates."""
        self.identity = (AgentKeyPair.load_or_generate(state_dir / agent_id) if state_dir is not None
                          else AgentKeyPair.generate())
        """Ed25519 identity: kept in ``state_dir`` across restarts when one is given."""
        self.datasets: dict[str, LocalDataset] = {}
        self.feedback = ErrorFeedback()
        """What compression dropped from this agent's updates, added to its next one (per training)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._joined_at = time.monotonic()
        self.completed_tasks = 0
        self.bus_errors = 0
        """Bus errors the heartbeat and inbox loops survived (lost connections, refused commands)."""
        self.secure = SecureParticipation(self.agent_id, send=self.send_update, upload=self.upload,
                                          on_submitted=self._count_completed)

    @property
    def owns_connection(self) -> bool:
        """Whether the agent opened (and closes) its connection itself."""
        return self._owns_redis

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "initialize() first"
        return self._redis

    @property
    def blobs(self) -> BlobStore:
        assert self._blobs is not None, "initialize() first"
        return self._blobs

    def add_dataset(self, name: str, x: NDArray[np.floating], y: NDArray[np.integer], *,
                    eval_fraction: float = 0.2, x_eval: NDArray[np.floating] | None = None,
                    y_eval: NDArray[np.integer] | None = None) -> None:
        """Hold (x, y) under ``name``, with a held-out part for evaluating received models.

        The held-out part is (x_eval, y_eval) when given, else ``eval_fraction`` of (x, y)
        (at least one example).
        """
        if len(x) != len(y) or len(y) < 1:
            raise ValueError(f"dataset '{name}' needs matching x and y with at least 1 example")
        if x_eval is not None and y_eval is not None:
            if len(x_eval) != len(y_eval) or len(y_eval) < 1:
                raise ValueError(f"dataset '{name}' needs matching x_eval and y_eval")
            self.datasets[name] = LocalDataset(x, y, x_eval, y_eval)
            return
        if not 0 < eval_fraction < 1 or len(y) < 2:
            raise ValueError(f"dataset '{name}': eval_fraction must be in (0, 1) and x hold >= 2 examples")
        order = np.random.default_rng(self.seed).permutation(len(y))
        n_eval = max(1, round(len(y) * eval_fraction))
        held, train = order[:n_eval], order[n_eval:]
        self.datasets[name] = LocalDataset(x[train], y[train], x[held], y[held])

    async def initialize(self) -> None:
        """Connect, join, and start the heartbeat and inbox loops."""
        if self._redis is None:
            from federated_learning.bus.connection import connect

            assert self._redis_url is not None
            self._redis = await connect(self._redis_url, tls=self._redis_tls)
        self.keys = keys_for(self.redis, self.keys.prefix)
        await self._settled_blobs()
        await ensure_group(self.redis, self.keys.inbox_stream(self.agent_id), GROUP_AGENT)
        await self.join()
        self._tasks = [asyncio.create_task(self._heartbeat_loop()),
                       asyncio.create_task(self._inbox_loop())]

    async def join(self) -> None:
        await append(self.redis, self.keys.agent_stream, encode(self.signed(self.join_message())))
        self._joined_at = time.monotonic()

    def join_message(self) -> AgentJoined:
        return AgentJoined(
            agent_id=self.agent_id,
            datasets=self.dataset_sizes(),
            device={"platform": platform.platform(), "python": platform.python_version()},
            public_key=self.identity.public_key_bytes.hex(),
            join_token=self.join_token,
        )

    def beat(self) -> Heartbeat | AgentJoined:
        """What the heartbeat loop sends: a heartbeat, or every ``REJOIN_INTERVAL_S`` the join
        again (the registry takes an unchanged one as a sign of life), so that a join the
        coordinator refused for a while (join_rate_limited) or a registry lost with the bus's data
        heals without a restart."""
        if time.monotonic() - self._joined_at >= REJOIN_INTERVAL_S:
            self._joined_at = time.monotonic()
            return self.join_message()
        return Heartbeat(agent_id=self.agent_id)

    def signed(self, message: SignedMessage) -> SignedMessage:
        """``message`` with this agent's Ed25519 signature."""
        return message.model_copy(update={"signature": self.identity.sign(message.signed_bytes()).hex()})

    async def send_update(self, message: SignedByAgent) -> None:
        """Sign ``message`` and append it to the update stream."""
        await append(self.redis, self.keys.update_stream, encode(self.signed(message)))

    async def upload(self, blob: bytes) -> BlobDigest:
        """Store ``blob`` as this agent's upload (kept ``UPDATE_BLOB_TTL_S``); returns its digest."""
        return await (await self._settled_blobs()).put(blob, ttl_s=UPDATE_BLOB_TTL_S, owner=self.agent_id)

    async def _settled_blobs(self) -> BlobStore:
        """The deployment's blob store: looked up again until the services published it (an
        agent may start before the coordinator did on a new deployment)."""
        if not self._blob_store_published:
            store, published = await agent_blob_store(self.redis, self.keys, max_bytes=self.max_blob_bytes,
                                                      blob_folder=self.blob_folder,
                                                      blob_endpoint_url=self.blob_endpoint_url)
            if self._blobs is None or store.describe() != self._blobs.describe():
                try:
                    await self._check_writable(store)  # raises before the agent settles on a store it cannot use
                except BaseException:
                    store.close()
                    raise
                if self._blobs is not None:
                    self._blobs.close()
                self._blobs = store
            elif store is not self._blobs:
                store.close()
            self._blob_store_published = published
        assert self._blobs is not None
        return self._blobs

    async def _check_writable(self, store: BlobStore) -> None:
        try:
            await store.check_writable(self.agent_id)
        except BlobStoreError as exc:
            raise BlobStoreUnreachable(f"agent {self.agent_id} cannot upload: {exc}") from exc

    def _count_completed(self) -> None:
        self.completed_tasks += 1

    async def close(self, reason: str = "shutting down") -> None:
        """Leave cleanly: tell the coordinator, stop the loops, close the connection."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await append(self.redis, self.keys.agent_stream,
                         encode(self.signed(AgentLeft(agent_id=self.agent_id, reason=reason))),
                         retry_for_s=LEAVE_RETRY_S)
        except (RedisError, OSError) as exc:
            log.warning("agent %s could not announce leaving: %s", self.agent_id, exc)
        if self._blobs is not None:
            self._blobs.close()
        if self._owns_redis:
            await self.redis.aclose()

    def _bus_error(self, loop: str, exc: Exception, backoff: float) -> None:
        """Log a bus error a loop survives: a lost connection, or a command the server refused
        (e.g. an XADD after another writer forged the stream's last id, until the services repair it)."""
        self.bus_errors += 1
        lost = isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError))
        log.warning("agent %s %s: %s (%s); retrying in %.1fs", self.agent_id, loop,
                    "lost the bus" if lost else "bus error", exc, backoff)

    async def _heartbeat_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                await self.redis.xadd(self.keys.agent_stream,
                                      encode(self.signed(self.beat())))
                backoff = 0.5
                await asyncio.sleep(self.heartbeat_interval_s)
            except (RedisError, OSError) as exc:
                self._bus_error("heartbeat", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_CAP_S)
                await self._rejoin()

    async def _rejoin(self) -> None:
        try:
            await ensure_group(self.redis, self.keys.inbox_stream(self.agent_id), GROUP_AGENT)
            await self.join()
        except (RedisError, OSError) as exc:
            log.info("agent %s could not join again yet: %s", self.agent_id, exc)

    async def _inbox_loop(self) -> None:
        inbox = self.keys.inbox_stream(self.agent_id)
        backoff = 0.5
        start = "0"  # first the tasks left pending by an earlier run, then new ones
        while not self._stop.is_set():
            try:
                reply = await self.redis.xreadgroup(GROUP_AGENT, self.agent_id, {inbox: start},
                                                    count=8, block=None if start == "0" else 1000)
                batches = group_batches(reply)
                entries = batches[0][1] if batches else []
                if start == "0" and not entries:
                    start = ">"
                for entry_id, fields in entries:
                    if fields:
                        await self._handle_safely(fields)
                    await self.redis.xack(inbox, GROUP_AGENT, entry_id)
                backoff = 0.5
            except (RedisError, OSError) as exc:
                self._bus_error("inbox", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_CAP_S)
                await self._rejoin()
                start = "0"

    async def _handle_safely(self, fields: dict[bytes, bytes]) -> None:
        """One task's failure (a diverging model, a bug in a trainer) must not stop the agent."""
        try:
            await self.handle_task(fields)
        except (BlobStoreError, BlobStoreUnreachable) as exc:  # the store, not the bus: the next task may work
            log.error("agent %s: task skipped: %s", self.agent_id, exc)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise
        except Exception:
            log.exception("agent %s: task failed; skipped", self.agent_id)

    async def handle_task(self, fields: dict[bytes, bytes]) -> None:
        """Evaluate the received model, train if asked, upload; a bad task is logged and skipped.

        Secure rounds: the update is held and keys advertised; the inbox's secure messages
        carry the exchange on."""
        if message_type(fields) in SECURE_INBOX_TYPES:
            await self.secure.handle(fields)
            return
        try:
            task = decode(Task, fields)
        except MalformedMessage as exc:
            log.warning("agent %s: malformed task skipped: %s", self.agent_id, exc.reason)
            return
        if task.dataset not in self.dataset_sizes() or time.time() > task.deadline_at:
            log.info("agent %s: skipping task %s/%d (%s)", self.agent_id, task.training_id, task.round,
                     "no such dataset" if task.dataset not in self.dataset_sizes() else "deadline passed")
            return
        if task.kind is TaskKind.PARAMETERS:
            await self.send_parameters(task)
            return
        if isinstance(task.model, MemoryBankModel):
            await self.send_bank(task, task.model)
            return
        assert task.model_digest is not None
        try:
            received = await self.read_model(task.model_digest)
        except (BlobMissing, InvalidTensor) as exc:
            log.warning("agent %s: model of %s/%d unreadable: %s", self.agent_id, task.training_id, task.round, exc)
            return
        try:
            # The user's get_parameters may take a while (a large state_dict): off the event loop.
            await asyncio.to_thread(self.check_model, task, received)
            evaluation, trained = await asyncio.to_thread(self._work, task, received)
        except InvalidTensor as exc:  # not the training's model, or the trainer's fit changed its layout
            log.warning("agent %s: model of %s/%d refused: %s", self.agent_id, task.training_id, task.round, exc)
            await self.refuse_model(task, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the trainer failed: the operator hears why
            await self.report_app_failure(task, exc)
            return
        common = {"training_id": task.training_id, "round": task.round, "attempt": task.attempt,
                      "agent_id": self.agent_id, "received_model_version": task.model_version,
                      "evaluation": evaluation}
        if trained is not None and trained.delta is not None:
            await self.secure.hold(task, evaluation, trained, trained.delta)
            return
        if trained is None:
            notice = UpdateSubmitted(kind=TaskKind.EVALUATE, num_examples=evaluation.num_examples,
                                     **common)  # type: ignore[arg-type]
        else:
            digest = await self.upload(trained.blob)
            notice = UpdateSubmitted(
                kind=TaskKind.TRAIN, update_digest=digest, num_examples=trained.num_examples,
                train_loss=trained.loss, train_accuracy=trained.accuracy,
                train_seconds=trained.seconds, upload_bytes=len(trained.blob),
                dense_bytes=trained.dense_bytes, unclipped=trained.unclipped, **common)  # type: ignore[arg-type]
        await self.send_update(notice)
        self.completed_tasks += 1

    async def read_model(self, digest: BlobDigest) -> NamedLayers:
        """The layers of a model a task names, read and checked (size, SHA-256, layout): once per
        process when the agents of this process share their models."""
        async def read() -> NamedLayers:
            return decode_layers(await (await self._settled_blobs()).get(digest), max_bytes=self.max_blob_bytes)
        if self.shared_models is None:
            return await read()
        return await self.shared_models.get(digest, self.max_blob_bytes, read)

    async def send_bank(self, task: Task, spec: MemoryBankModel) -> None:
        """Answer a memory-bank task: extract this agent's features, keep a local coreset, upload it."""
        if not isinstance(self.trainer, MemoryBankTrainer):
            await self.refuse_model(task, InvalidTensor(
                "not_a_memory_bank", "this agent's app has no extract_features(); a memory-bank training "
                                     "needs a feature extractor (see agents.app.MemoryBankTrainer)"))
            return
        seed = zlib.crc32(f"{self.agent_id}/{task.training_id}/{task.round}".encode())
        try:
            bank = await asyncio.to_thread(local_bank, self.trainer, task, spec, seed=seed)
        except InvalidTensor as exc:
            log.warning("agent %s: bank of %s/%d refused: %s", self.agent_id, task.training_id, task.round, exc)
            await self.refuse_model(task, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the user's extractor failed: the operator hears why
            await self.report_app_failure(task, exc)
            return
        blob = encode_layers({BANK_LAYER: bank.rows})
        digest = await self.upload(blob)
        notice = UpdateSubmitted(
            kind=TaskKind.TRAIN, training_id=task.training_id, round=task.round, attempt=task.attempt,
            agent_id=self.agent_id, update_digest=digest, num_examples=bank.num_examples,
            received_model_version=task.model_version, train_seconds=bank.seconds, upload_bytes=len(blob),
            dense_bytes=bank.extracted_bytes)
        await self.send_update(notice)
        self.completed_tasks += 1

    def model_trainer(self) -> Trainer | None:
        """The user's model trainer; None: the built-in presets. An app that only extracts features
        (memory banks) trains no model: InvalidTensor, which the agent reports as a refusal."""
        if self.trainer is None or isinstance(self.trainer, Trainer):
            return self.trainer
        raise InvalidTensor("not_a_model", "this agent's app extracts features for memory-bank trainings "
                                           "(extract_features) and trains no model")

    async def send_parameters(self, task: Task) -> None:
        """Answer a parameters task: this agent's initial model becomes the training's version 0
        (and fixes its layout) when it is the first to answer."""
        if not isinstance(self.trainer, Trainer):
            await self.refuse_model(task, InvalidTensor(
                "no_trainer", "this agent holds no model of its own (it runs the built-in trainers, or "
                              "extracts features for memory banks)"))
            return
        parameters = await asyncio.to_thread(self.trainer.get_parameters, task_config(task))
        blob = encode_layers({name: np.asarray(layer) for name, layer in parameters.items()})
        digest = await self.upload(blob)
        notice = UpdateSubmitted(kind=TaskKind.PARAMETERS, training_id=task.training_id, round=task.round,
                                 attempt=task.attempt, agent_id=self.agent_id, update_digest=digest,
                                 num_examples=0, received_model_version=0, upload_bytes=len(blob))
        await self.send_update(notice)

    async def report_app_failure(self, task: Task, exc: Exception) -> None:
        """The agent's app (its trainer or feature extractor) raised: log the traceback here and
        tell the coordinator, which counts this agent as answered instead of waiting for the deadline."""
        log.error("agent %s: the app failed on %s/%d", self.agent_id, task.training_id, task.round, exc_info=exc)
        await self.refuse_model(task, InvalidTensor("app_failed", f"the agent's app raised {type(exc).__name__}: {exc}"))

    async def refuse_model(self, task: Task, problem: InvalidTensor) -> None:
        """Tell the coordinator why this agent cannot train the training's model (the operator sees it)."""
        refusal = ModelRefused(training_id=task.training_id, round=task.round, attempt=task.attempt,
                               agent_id=self.agent_id, reason=problem.reason, detail=problem.detail[:1000])
        await self.send_update(refusal)

    def dataset_sizes(self) -> dict[str, int]:
        """What this agent announces it holds: dataset name -> training examples."""
        return {**{name: data.size for name, data in self.datasets.items()}, **self._app_dataset}

    def own_layout(self, task: Task) -> dict[str, tuple[tuple[int, ...], str]]:
        """The layout of the model this agent trains: its trainer's, or the task's preset's."""
        trainer = self.model_trainer()
        if trainer is not None:
            return layout_of(trainer.get_parameters(task_config(task)))
        if not isinstance(task.model, PresetModel):
            raise InvalidTensor("no_trainer", "this agent runs the built-in trainers only; the training's "
                                              "model is the user's own (start the agent with its trainer)")
        return {s.name: (tuple(s.shape), s.dtype) for s in trainer_for(task.model).layer_specs()}

    def check_model(self, task: Task, received: NamedLayers) -> None:
        """Refuse (InvalidTensor naming the layer, the training's and this agent's shape and
        dtype) a received model that is not the model this agent trains."""
        own = self.own_layout(task)
        if isinstance(self.trainer, FlowerTrainer):  # Flower's parameters are matched by position
            own = dict(zip(received, own.values(), strict=False)) if len(own) == len(received) else own
        elif set(own) == set(received):  # named layers are matched by name, in any order
            own = {name: own[name] for name in received}
        problem = layout_mismatch(own, spec_of(received))
        if problem is not None:
            raise InvalidTensor(problem.reason, f"this agent's model differs from the training's: {problem.detail} "
                                                f"(expected: the training's model; received: this agent's)")
        validate_layers(received, spec_of(received))

    def evaluate_and_train(self, task: Task, weights: dict[str, NDArray[np.floating]]
                           ) -> tuple[Evaluation, LocalResult | None]:
        """Evaluate the received model on held-out data; for train tasks, train on local data."""
        own = self.model_trainer()
        if own is not None:
            return run_trainer(own, task, weights)
        assert isinstance(task.model, PresetModel)
        trainer = trainer_for(task.model)
        data = self.datasets[task.dataset]
        evaluated = trainer.evaluate(weights, data.x_eval, data.y_eval)
        evaluation = Evaluation(loss=float(evaluated.loss), accuracy=float(evaluated.accuracy),
                                num_examples=int(evaluated.num_examples))
        if task.kind is TaskKind.EVALUATE:
            return evaluation, None
        settings = task.settings
        local, result = trainer.train(
            weights, data.x_train, data.y_train, epochs=settings.epochs,
            batch_size=settings.batch_size, learning_rate=settings.learning_rate,
            proximal_mu=settings.proximal_mu,
            seed=zlib.crc32(f"{self.seed}/{self.agent_id}/{task.training_id}/{task.round}".encode()),
        )
        return evaluation, LocalResult(dict(local), int(result.num_examples), float(result.loss),
                                       float(result.accuracy))

    def _work(self, task: Task, received: NamedLayers) -> tuple[Evaluation, TrainedUpdate | None]:
        """Evaluate and train, then attack (experiments only), clip, noise and compress the update."""
        weights = {name: np.asarray(a) for name, a in received.items()}
        started = time.perf_counter()
        evaluation, result = self.evaluate_and_train(task, weights)
        if result is None:
            return evaluation, None
        settings = task.settings
        local = {name: np.asarray(layer, dtype=weights[name].dtype) for name, layer in result.layers.items()}
        if settings.clip_norm is not None or task.secure or settings.compression != "none":
            # Integer layers (counters) are carried only from plain updates: under DP, masking or
            # compression the update is its float part, and the counters stay the global model's.
            local = {name: layer if is_float(layer.dtype.name) else weights[name] for name, layer in local.items()}
        if self.attack is not None:
            local = poison_update(self.attack, weights, local, np.random.default_rng(task.round))
        unclipped: bool | None = None
        if settings.clip_norm is not None:
            local, norm = clip_update_with_norm(weights, local, settings.clip_norm, settings.clip_norm_type)
            unclipped = norm <= settings.clip_norm
        if settings.local_noise_std is not None or settings.local_laplace_scale is not None:
            trained = [name for name in local if is_float(local[name].dtype.name)]
            deltas = [local[name].astype(np.float64) - weights[name] for name in trained]
            noised = (add_gaussian_noise(deltas, settings.local_noise_std, secure_rng())
                      if settings.local_noise_std is not None
                      else add_laplace_noise(deltas, settings.local_laplace_scale or 0.0, secure_rng()))
            local = {**local, **{name: (weights[name] + delta).astype(local[name].dtype)
                                 for name, delta in zip(trained, noised, strict=True)}}
        secure_delta: NDArray[np.floating] | None = None
        if task.secure:
            blob = b""
            secure_delta = np.concatenate([(local[name].astype(np.float64) - weights[name]).ravel()
                                           for name in local if is_float(local[name].dtype.name)])
        elif settings.compression == "none":
            blob = encode_layers(local)
        else:
            delta = [(local[name].astype(np.float32, copy=False) - weights[name]).astype(np.float32, copy=False)
                     for name in local if is_float(local[name].dtype.name)]
            compressor = make_compressor(settings.compression, settings.compression_fraction,
                                         np.random.default_rng(zlib.crc32(f"{self.agent_id}/{task.round}".encode())))
            blob = encode_compressed(self.feedback.compress(task.training_id, delta, compressor))
        return evaluation, TrainedUpdate(
            blob=blob, num_examples=result.num_examples,
            dense_bytes=sum(int(a.nbytes) for a in local.values()),
            loss=result.loss, accuracy=result.accuracy, seconds=time.perf_counter() - started, delta=secure_delta,
            unclipped=unclipped)
