"""Message models for every stream, one pydantic model per direction.

Every message carries ``schema_version``; a reader refuses versions it does not
know. Messages are serialised to JSON only at the stream boundary
(:func:`encode` / :func:`decode_*`), in a single stream field ``m``.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeAlias, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    TypeAdapter,
    model_validator,
)

from federated_learning.versioning.rollback import RollbackConfig

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

MAX_MODEL_PARAMETERS = 50_000_000
SCHEMA_VERSION: Final = 1
PAYLOAD_FIELD = b"m"

Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
"""Ids of trainings, agents, datasets: they name files and keys, so never '.', '..' or a leading dot."""
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
StrictFiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]
"""A finite float that is not a bool in disguise."""
NonNegativeFloat = Annotated[float, Field(allow_inf_nan=False, ge=0)]
PublicKeyHex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A raw 32-byte X25519 public key, hex."""
SessionIdHex = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
MAX_EXAMPLES = 1_000_000_000
"""Most examples any message may declare; a training bounds what one update weighs far lower
(``TrainingConfig.max_examples_per_update``)."""
MAX_DATASETS = 64
"""Most datasets one agent may announce."""
MAX_PARAM_MAGNITUDE = 1e6
AlgorithmParam = (Annotated[StrictInt, Field(ge=-int(MAX_PARAM_MAGNITUDE), le=int(MAX_PARAM_MAGNITUDE))]
                  | Annotated[StrictFloat, Field(allow_inf_nan=False, ge=-MAX_PARAM_MAGNITUDE, le=MAX_PARAM_MAGNITUDE)]
                  | Annotated[StrictStr, Field(max_length=64)])
"""A rule parameter: a bounded number (no rule's parameter is sensibly larger, and e.g. eta = 1e300
makes every aggregate non-finite) or a short name."""
MAX_MEMBERS = 10_000
"""Most agents in one secure-aggregation session."""


def canonical_json(fields: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same bytes for the same fields on every side."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION


class SignedByAgent(BaseModel):
    """A message its agent signs with its Ed25519 identity (mixin; the signature is last)."""

    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$",
                                  description="hex Ed25519 signature of signed_bytes()")

    def signed_bytes(self) -> bytes:
        """What the agent signs: the canonical JSON of every field but the signature."""
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))


# -- trainings ------------------------------------------------------------------


class TrainingStatus(StrEnum):
    QUEUED = "queued"
    CREATED = "created"
    INITIALIZING = "initializing"
    RUNNING = "running"
    PAUSED = "paused"
    EVALUATING = "evaluating"
    SAVING = "saving"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def is_final(self) -> bool:
        return self in (TrainingStatus.COMPLETED, TrainingStatus.FAILED, TrainingStatus.STOPPED)


class RoundPhase(StrEnum):
    IDLE = "idle"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"


class PresetModel(BaseModel):
    """A built-in model (softmax regression or a small MLP) that the agents' built-in trainers
    build, initialise from ``seed`` and train."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trainer: Literal["softmax", "mlp"] = "softmax"
    num_features: int = Field(gt=0, le=1_000_000)
    num_classes: int = Field(ge=2, le=100_000)
    hidden: int = Field(default=64, gt=0, le=65_536)
    seed: int = 0

    @model_validator(mode="after")
    def _bounded_size(self) -> PresetModel:
        inner = self.hidden if self.trainer == "mlp" else self.num_classes
        parameters = self.num_features * inner + (self.hidden * self.num_classes if self.trainer == "mlp" else 0)
        if parameters > MAX_MODEL_PARAMETERS:
            raise ValueError(f"model of about {parameters} parameters exceeds {MAX_MODEL_PARAMETERS}")
        return self


class UploadedModel(BaseModel):
    """The user's own model, uploaded with ``POST /api/models``: its first version is that file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_id: Identifier
    digest: Digest | None = Field(
        default=None, description="SHA-256 of the uploaded safetensors file; filled in when the training "
                                  "starts (REST and the Python client resolve model_id to it)")


class FirstAgentModel(BaseModel):
    """The user's own model as the first agent holds it (Flower's behaviour when a server has no
    initial parameters): one agent's ``get_parameters`` is version 0 and fixes the layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    from_first_agent: Literal[True] = True


MAX_BANK_FEATURES = 16_384
MAX_GLOBAL_BANK_ROWS = 1_000_000
MAX_AGENT_BANK_ROWS = 1_000_000


class MemoryBankModel(BaseModel):
    """A memory bank (federated PatchCore, Roth et al. 2021, arXiv:2106.08265): each agent extracts
    patch features with a frozen backbone and uploads a local coreset of them (``rows x
    feature_dim``); the server merges the banks into one global bank of at most
    ``global_bank_size`` rows, published as a version like any model; anomaly scores are
    nearest-neighbour distances to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["memory_bank"]
    feature_dim: int = Field(ge=1, le=MAX_BANK_FEATURES, description="D: the width of every bank row")
    global_bank_size: int = Field(default=10_000, ge=1, le=MAX_GLOBAL_BANK_ROWS,
                                  description="most rows the merged bank keeps")
    aggregation_strategy: Literal["coreset", "random"] = Field(
        default="coreset", description="coreset: greedy k-center over the uploaded rows; random: uniform rows")
    weighted: bool = Field(
        default=True, description="share the global bank among agents in proportion to their example "
                                  "counts; False: one pool of rows, whoever uploaded them")
    local_coreset_fraction: FiniteFloat = Field(
        default=0.1, gt=0, le=1, description="share of its features an agent keeps (greedy k-center) "
                                             "before uploading")
    max_rows_per_agent: int = Field(default=50_000, ge=1, le=MAX_AGENT_BANK_ROWS,
                                    description="most rows one agent may upload in a round")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="seeds the coreset's first row and projection")

    @model_validator(mode="after")
    def _bounded_size(self) -> MemoryBankModel:
        for name, rows in (("global_bank_size", self.global_bank_size),
                           ("max_rows_per_agent", self.max_rows_per_agent)):
            if rows * self.feature_dim > MAX_MODEL_PARAMETERS:
                raise ValueError(f"{name} x feature_dim = {rows * self.feature_dim} values exceeds "
                                 f"{MAX_MODEL_PARAMETERS}")
        return self


BANK_LAYER = "bank"
"""The one tensor of an agent's bank upload and of a memory-bank version: rows x feature_dim."""
BANK_EXAMPLES_LAYER = "examples"
"""In a memory-bank version: how many examples (int64 scalar) the bank's rows stand for."""


def _model_kind(value: object) -> str:
    keys = set(value) if isinstance(value, dict) else set(vars(value)) if hasattr(value, "__dict__") else set()
    if "kind" in keys:
        return "memory_bank"
    if "model_id" in keys:
        return "uploaded"
    if "from_first_agent" in keys:
        return "first_agent"
    return "preset"


ModelSpec: TypeAlias = Annotated[
    Annotated[PresetModel, Tag("preset")] | Annotated[UploadedModel, Tag("uploaded")]
    | Annotated[FirstAgentModel, Tag("first_agent")] | Annotated[MemoryBankModel, Tag("memory_bank")],
    Discriminator(_model_kind),
]
"""Which model a training trains: ``{"trainer": "softmax", "num_features": ..., "num_classes": ...}``
(a built-in preset), ``{"model_id": ...}`` (an uploaded model), ``{"from_first_agent": true}``, or
``{"kind": "memory_bank", "feature_dim": ...}`` (a memory bank of features, not weights)."""


class LocalTrainingSettings(BaseModel):
    """What an agent does with a task: its local optimisation settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=1_000_000)
    learning_rate: FiniteFloat = Field(default=0.1, gt=0, le=100)
    proximal_mu: FiniteFloat = Field(default=0.0, ge=0, le=1000)
    clip_norm: FiniteFloat | None = Field(default=None, gt=0, le=1e6)
    clip_norm_type: Literal["l2", "l1"] = Field(
        default="l2", description="the norm clip_norm bounds: l2 (Gaussian mechanism) or l1 (Laplace)")
    local_noise_std: FiniteFloat | None = Field(default=None, gt=0, le=1e6,
                                                description="local DP: gaussian noise the agent adds to its clipped update")
    local_laplace_scale: FiniteFloat | None = Field(
        default=None, gt=0, le=1e6, description="local DP with the Laplace mechanism: scale b of the "
                                                "Laplace noise the agent adds to its L1-clipped update")
    compression: Literal["none", "top_k", "random_k", "q8", "q4"] = "none"
    compression_fraction: FiniteFloat = Field(default=0.1, gt=0, le=1,
                                              description="share of coordinates top_k/random_k keep")


PrivacyLevelName = Literal["none", "low", "medium", "high"]
AlgorithmName = Literal[
    "fedavg", "fedsgd", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "perffedavg",
    "krum", "multikrum", "trimmed_mean", "median", "bulyan", "fedbuff", "memory_bank",
]
"""Aggregation rules a training can name; their parameters follow Flower's. ``fedbuff``
trains buffered-asynchronously (no rounds for agents to wait on); ``memory_bank`` merges feature
banks (the rule of, and only of, a training whose model is a :class:`MemoryBankModel`)."""
ASYNC_ALGORITHMS = frozenset({"fedbuff"})
SECURE_ALGORITHMS = frozenset({"fedavg", "fedsgd", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"})
"""Rules that need only the example-weighted mean of the updates, which secure aggregation
reveals; the others need each update (distances, order statistics, per-agent accuracies) or
no rounds at all (fedbuff), and are refused for secure trainings."""
MIN_SECURE_CLIENTS = 3
"""Fewest agents a secure round may aggregate: with two, each learns the other's update."""


class AdaptiveClippingConfig(BaseModel):
    """Adaptive quantile clipping (Andrew et al. 2021): the clip norm follows a quantile of the
    agents' update norms, learnt from one bit per agent and round (was my update within C?)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    target_quantile: FiniteFloat = Field(default=0.5, gt=0, lt=1)
    learning_rate: FiniteFloat = Field(default=0.2, gt=0, le=10)
    count_noise_std: FiniteFloat | None = Field(
        default=None, ge=0, le=1e6,
        description="std of the gaussian noise on the count of unclipped updates; None: "
                    "clients_per_round / 20, and with central DP at least the noise multiplier")


class TrainingConfig(BaseModel):
    """A training as a user asks for it (REST body of ``POST /api/training/start``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(default="training", min_length=1, max_length=200)
    dataset: Identifier
    model: ModelSpec
    algorithm: AlgorithmName = "fedavg"
    algorithm_params: dict[Annotated[str, Field(max_length=64)], AlgorithmParam] = Field(
        default_factory=dict, max_length=32,
        description=f"the rule's parameters by Flower's names: numbers within +-{MAX_PARAM_MAGNITUDE:g} or names")
    rounds: int = Field(default=10, ge=1, le=100_000)
    min_clients: int | None = Field(default=None, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1)
    over_selection: FiniteFloat = Field(default=1.2, ge=1.0, le=3.0)
    selection: Literal["random", "importance", "reliability", "contribution"] = "random"
    max_tasks_per_agent_per_hour: int | None = Field(default=None, ge=1, le=100_000)
    round_deadline_s: FiniteFloat | None = Field(default=None, gt=0, le=86_400)
    max_round_attempts: int = Field(default=3, ge=1, le=100)
    max_examples_per_update: int = Field(
        default=1_000_000, ge=1, le=MAX_EXAMPLES,
        description="most examples one update may declare (what one agent can weigh in FedAvg-style rules); "
                    "a notice above it is refused")
    max_staleness: int = Field(default=10, ge=0, le=10_000,
                               description="asynchronous trainings: oldest base version accepted, in versions")
    local: LocalTrainingSettings = Field(default_factory=LocalTrainingSettings)
    privacy_level: PrivacyLevelName | None = None
    privacy_mode: Literal["central", "local"] = Field(
        default="central", description="central: the privacy manager noises the aggregate; local: each "
                                       "agent noises its own clipped update before upload")
    noise_mechanism: Literal["gaussian", "laplace"] = Field(
        default="gaussian",
        description="gaussian: updates clipped in L2, noise calibrated with the RDP accountant to the "
                    "level's (epsilon, delta); laplace: updates clipped in L1, each release epsilon/rounds-DP "
                    "(pure), composed to the level's epsilon")
    validation_data: str | None = Field(
        default=None, max_length=1000,
        description="server-side .npz (x, y) that scores every committed version; the rollback policy "
                    "then judges on it")
    rollback: RollbackConfig | None = Field(
        default=None, description="automatic rollback policy; None: off (federated evaluations on a "
                                  "few non-IID agents are noisy, so the operator opts in)")
    target_accuracy: FiniteFloat | None = Field(default=None, gt=0, le=1)
    adaptive_clipping: AdaptiveClippingConfig | None = Field(
        default=None, description="let the clip norm track a quantile of the update norms; None: fixed")
    secure_aggregation: bool = Field(
        default=False, description="pairwise-masked secure aggregation: the server learns only the "
                                   "weighted mean of each round's updates")
    secure_threshold: FiniteFloat = Field(
        default=2 / 3, gt=0.5, lt=1.0,
        description="secure aggregation: fraction of the round's members whose shares rebuild a secret")

    @model_validator(mode="before")
    @classmethod
    def _memory_bank_defaults(cls, data: Any) -> Any:
        """A memory-bank training's rule is ``memory_bank`` and its privacy level ``none`` unless
        the request names others (which ``_check_memory_bank`` then refuses with the reason)."""
        model = data.get("model") if isinstance(data, dict) else None
        is_bank = isinstance(model, MemoryBankModel) or (isinstance(model, dict) and "kind" in model)
        if is_bank:
            data = {"algorithm": "memory_bank", "privacy_level": "none", **data}
        return data

    @property
    def kind(self) -> Literal["model", "memory_bank"]:
        """What the agents train: a model's weights, or a memory bank of features."""
        return "memory_bank" if isinstance(self.model, MemoryBankModel) else "model"

    @model_validator(mode="after")
    def _clients_consistent(self) -> TrainingConfig:
        if self.kind == "memory_bank" or self.algorithm == "memory_bank":
            self._check_memory_bank()
        if self.min_clients and self.clients_per_round and self.min_clients > self.clients_per_round:
            raise ValueError(
                f"min_clients ({self.min_clients}) must not exceed clients_per_round "
                f"({self.clients_per_round})"
            )
        if self.privacy_mode == "local" and self.local.compression != "none":
            raise ValueError("local DP needs uncompressed updates: the noise is added after clipping, "
                             "and compressing it away would void the guarantee")
        if self.algorithm == "fedprox" and self.local.proximal_mu == 0.0:
            raise ValueError("algorithm 'fedprox' needs local.proximal_mu > 0")
        if self.secure_aggregation:
            self._check_secure()
        if self.adaptive_clipping is not None and self.noise_mechanism == "laplace":
            raise ValueError("adaptive clipping's privacy (Andrew et al. 2021) is proven for the Gaussian "
                             "mechanism; with noise_mechanism 'laplace' use a fixed clip norm")
        if self.adaptive_clipping is not None and self.privacy_mode == "local":
            raise ValueError("adaptive clipping noises the count of unclipped updates centrally; with local "
                             "DP each agent's bit would be released without noise (use privacy_mode 'central')")
        return self

    def _check_memory_bank(self) -> None:
        """Banks are rows of features, not weights: what averages, clips or noises weights does
        not apply to them, and a request that asks for it is refused with the reason."""
        if self.kind != "memory_bank":
            raise ValueError("algorithm 'memory_bank' merges feature banks; it needs a model "
                             '{"kind": "memory_bank", "feature_dim": ...}')
        refusals = [
            (self.algorithm != "memory_bank",
             (f"algorithm '{self.algorithm}' weighs model updates; a memory-bank training merges banks "
              "(algorithm 'memory_bank', the default)")),
            (bool(self.algorithm_params),
             "algorithm_params do not apply to memory banks: the bank's settings are in the model"),
            (self.secure_aggregation,
             "secure aggregation reveals only a sum of updates; merging banks needs each bank's rows"),
            (self.privacy_level not in (None, "none") or self.privacy_mode == "local",
             ("differential privacy is calibrated for clipped weight updates, not for bank rows; a "
              "memory-bank training runs with privacy_level 'none'")),
            (self.adaptive_clipping is not None or self.local.clip_norm is not None
             or self.local.local_noise_std is not None or self.local.local_laplace_scale is not None,
             "clipping and local noise apply to weight updates, not to bank rows"),
            (self.local.compression != "none", "compression applies to weight updates, not to bank rows"),
            (self.rollback is not None or self.target_accuracy is not None or self.validation_data is not None,
             ("rollback, target_accuracy and validation_data judge a model's accuracy; a memory bank "
              "has none (score it with federated_learning.memory_bank)")),
        ]
        for refused, reason in refusals:
            if refused:
                raise ValueError(f"memory-bank training: {reason}")

    def _check_secure(self) -> None:
        if self.algorithm not in SECURE_ALGORITHMS:
            raise ValueError(
                f"secure aggregation reveals only the weighted mean of the updates; algorithm "
                f"'{self.algorithm}' needs more and is refused (use one of {', '.join(sorted(SECURE_ALGORITHMS))})")
        if self.local.compression != "none":
            raise ValueError("secure aggregation masks dense updates; compression is refused with it")
        if self.privacy_mode == "local":
            raise ValueError("secure aggregation encodes updates clipped to the clip norm; local DP noise "
                             "would overflow that range (use privacy_mode 'central' with secure aggregation)")
        if self.min_clients is not None and self.min_clients < MIN_SECURE_CLIENTS:
            raise ValueError(f"secure aggregation needs min_clients >= {MIN_SECURE_CLIENTS}; "
                             f"got {self.min_clients}")


class StartTraining(Message):
    type: Literal["start_training"] = "start_training"
    training_id: Identifier
    config: TrainingConfig
    org_id: Identifier = "default"
    project_id: Identifier = "default"
    requested_at: float = Field(default_factory=time.time)


class StopTraining(Message):
    type: Literal["stop_training"] = "stop_training"
    training_id: Identifier
    reason: str = Field(default="stopped by operator", max_length=500)
    failed: bool = False


class RollbackTraining(Message):
    """Operator's request: continue the training from ``version``."""

    type: Literal["rollback_training"] = "rollback_training"
    training_id: Identifier
    version: int = Field(ge=0)
    reason: str = Field(default="rolled back by operator", max_length=500)


ControlCommand: TypeAlias = Annotated[StartTraining | StopTraining | RollbackTraining,
                                      Field(discriminator="type")]


# -- agents -------------------------------------------------------------------


class AgentJoined(Message, SignedByAgent):
    """Signed with the key it binds (proof of possession)."""

    type: Literal["join"] = "join"
    agent_id: Identifier
    datasets: dict[Identifier, Annotated[int, Field(ge=0, le=MAX_EXAMPLES)]] = Field(max_length=MAX_DATASETS)
    device: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=32, description="free-form facts (os, python...): 32 entries at most")
    public_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                   description="hex of the agent's raw Ed25519 public key")
    volunteer: bool = Field(default=False, description="sends updates unasked (plain-HTTP clients)")
    join_token: str | None = Field(default=None, max_length=128,
                                   description="needed for a first join when registration is closed")
    sent_at: FiniteFloat = Field(default_factory=time.time, ge=0)


class Heartbeat(Message, SignedByAgent):
    type: Literal["heartbeat"] = "heartbeat"
    agent_id: Identifier
    sent_at: FiniteFloat = Field(default_factory=time.time, ge=0)


class AgentLeft(Message, SignedByAgent):
    type: Literal["leave"] = "leave"
    agent_id: Identifier
    reason: str = Field(default="", max_length=500)
    sent_at: FiniteFloat = Field(default_factory=time.time, ge=0)


AgentMessage: TypeAlias = Annotated[
    AgentJoined | Heartbeat | AgentLeft, Field(discriminator="type")
]


class TaskKind(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    PARAMETERS = "parameters"
    """Send your model's initial parameters (a training whose model is ``from_first_agent``)."""


class Task(Message):
    """What the coordinator asks of one agent for one round."""

    type: Literal["task"] = "task"
    kind: TaskKind
    training_id: Identifier
    round: int = Field(ge=0)
    attempt: int = Field(ge=1)
    dataset: Identifier
    model: ModelSpec
    model_digest: Digest | None = Field(default=None, description="the global model; None in a parameters task")
    model_version: int = Field(ge=0)
    settings: LocalTrainingSettings
    deadline_at: float
    secure: bool = Field(default=False, description="hold the update for the secure-aggregation exchange")

    @model_validator(mode="after")
    def _model_named(self) -> Task:
        if (self.model_digest is None) != (self.kind is TaskKind.PARAMETERS):
            raise ValueError("a parameters task names no model; train and evaluate tasks name one")
        return self


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    loss: FiniteFloat = Field(ge=0)
    accuracy: FiniteFloat = Field(ge=0, le=1)
    num_examples: int = Field(ge=0, le=MAX_EXAMPLES)


class UpdateSubmitted(Message, SignedByAgent):
    """An agent's notice that its update blob is uploaded (or, for evaluate tasks, its report).

    Its signature covers the update blob too: the notice names the blob's SHA-256."""

    type: Literal["update"] = "update"
    kind: TaskKind = TaskKind.TRAIN
    training_id: Identifier
    round: int = Field(ge=0)
    attempt: int = Field(ge=1)
    agent_id: Identifier
    update_digest: Digest | None = None
    num_examples: int = Field(ge=0, le=MAX_EXAMPLES)
    train_loss: FiniteFloat | None = None
    train_accuracy: FiniteFloat | None = Field(default=None, ge=0, le=1)
    received_model_version: int = Field(ge=0)
    evaluation: Evaluation | None = None
    train_seconds: FiniteFloat = Field(default=0.0, ge=0)
    upload_bytes: int = Field(default=0, ge=0, description="size of the uploaded blob")
    dense_bytes: int = Field(default=0, ge=0, description="size the update would have as dense float32")
    unclipped: bool | None = Field(
        default=None, description="whether the update's norm was within the task's clip norm before "
                                  "clipping (the bit adaptive clipping learns from); None: no clip norm")
    @model_validator(mode="after")
    def _train_has_blob(self) -> UpdateSubmitted:
        if self.kind is TaskKind.TRAIN and (self.update_digest is None or self.num_examples <= 0):
            raise ValueError("a train notice needs update_digest and num_examples > 0")
        if self.kind is TaskKind.PARAMETERS and self.update_digest is None:
            raise ValueError("a parameters notice needs update_digest (the agent's initial model)")
        if self.kind is TaskKind.EVALUATE and self.evaluation is None:
            raise ValueError("an evaluate notice needs evaluation")
        return self


class ModelRefused(Message, SignedByAgent):
    """An agent's word that the training's model is not the model it trains (another layout):
    the coordinator shows the reason in the training's status and raises an alert."""

    type: Literal["model_refused"] = "model_refused"
    training_id: Identifier
    round: int = Field(ge=0)
    attempt: int = Field(ge=1)
    agent_id: Identifier
    reason: str = Field(max_length=64, pattern=r"^[a-z_]+$")
    detail: str = Field(max_length=1000)


# -- pipeline -------------------------------------------------------------------


class UpdateAccepted(Message):
    """An update the coordinator accepted into ``round`` (a buffer number in buffered trainings)
    after checking its blob's header: the aggregator reads the blob whole now, while the round
    collects, and refuses it (:class:`UpdateRefused`) or keeps it for the job."""

    type: Literal["update_accepted"] = "update_accepted"
    training_id: Identifier
    round: int = Field(ge=0)
    agent_id: Identifier
    update_digest: Digest
    model_version: int = Field(ge=0, description="the version the update was trained from")


class UpdateRefused(Message):
    """The aggregator read an accepted update whole and found it invalid (its hash, its values, a
    compressed delta that does not fit the model). The coordinator counts the refusal and, while the
    round still collects, withdraws the update, so the agent may send another."""

    type: Literal["update_refused"] = "update_refused"
    training_id: Identifier
    round: int = Field(ge=0)
    agent_id: Identifier
    update_digest: Digest
    reason: str = Field(max_length=64, pattern=r"^[a-z_]+$")
    detail: str = Field(max_length=1000)



class UpdateRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    agent_id: Identifier
    digest: Digest
    num_examples: int = Field(gt=0)
    model_version: int = Field(default=0, ge=0, description="the version the update was trained from")
    model_digest: Digest | None = Field(
        default=None, description="that version's model when it is not the job's base (asynchronous "
                                  "trainings): the aggregator re-bases the update onto the job's base")
    metrics: dict[str, FiniteFloat] = Field(default_factory=dict)


class RosterMember(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    agent_id: Identifier
    cipher_public_key: PublicKeyHex
    mask_public_key: PublicKeyHex
    num_examples: int = Field(gt=0)


class SecureSession(BaseModel):
    """What every member and the aggregator must agree on for one session."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    session_id: SessionIdHex
    threshold: int = Field(ge=2)
    vector_length: int = Field(ge=1)
    scale: FiniteFloat = Field(gt=0)
    clip_range: FiniteFloat = Field(gt=0)
    weight_normaliser: int = Field(gt=0, description="each agent masks (num_examples / this) * delta")
    counts_unclipped: bool = Field(
        default=False, description="adaptive clipping: each masked vector ends with one more value, "
                                   "clip_range when the update's norm was within the clip norm, else 0, "
                                   "so only the count of unclipped updates is ever unmasked")
    members: list[RosterMember] = Field(min_length=2, max_length=MAX_MEMBERS)


class SecureAggregationSpec(BaseModel):
    """In an aggregation job: how the aggregator removes the masks of a secure round."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    session: SecureSession
    attempt: int = Field(ge=1, description="the round attempt whose exchange holds the unmask shares")
    share_senders: list[Identifier] = Field(min_length=2)
    responders: list[Identifier] = Field(min_length=2, description="whose unmask shares to use")


class AggregationJob(Message):
    type: Literal["aggregation_job"] = "aggregation_job"
    training_id: Identifier
    round: int = Field(ge=1)
    attempt: int = Field(ge=1)
    algorithm: str
    algorithm_params: dict[Annotated[str, Field(max_length=64)], AlgorithmParam] = Field(
        default_factory=dict, max_length=32,
        description=f"the rule's parameters by Flower's names: numbers within +-{MAX_PARAM_MAGNITUDE:g} or names")
    base_version: int = Field(ge=0)
    base_digest: Digest
    state_digest: Digest | None = None
    clip_norm: FiniteFloat | None = Field(default=None, gt=0,
                                          description="central DP: the aggregator clips every update to it")
    clip_norm_type: Literal["l2", "l1"] = "l2"
    carry_integers: bool = Field(
        default=True, description="integer layers take the maximum of the updates; False where updates are "
                                  "clipped, masked or compressed (the agents reset them; the global values stay)")
    updates: list[UpdateRef] = Field(min_length=1)
    min_updates: int = Field(default=1, ge=1, description="the aggregator drops invalid updates and fails the "
                                                          "job when fewer than this remain (the training's min_clients)")
    memory_bank: MemoryBankModel | None = Field(
        default=None, description="a memory-bank training: merge the uploaded banks into the base bank")
    secure: SecureAggregationSpec | None = Field(
        default=None, description="the updates are masked: remove the masks, then aggregate their mean")

    @property
    def job_key(self) -> str:
        return f"{self.training_id}/{self.round}/{self.attempt}"


class AggregateReady(Message):
    type: Literal["aggregate_ready"] = "aggregate_ready"
    training_id: Identifier
    round: int = Field(ge=1)
    attempt: int = Field(ge=1)
    base_version: int = Field(ge=0)
    model_digest: Digest
    state_digest: Digest | None = None
    contributors: list[Identifier]
    num_examples: int = Field(ge=0)
    max_client_examples: int = Field(default=0, ge=0)
    aggregation_seconds: FiniteFloat = Field(ge=0)
    update_norm_mean: FiniteFloat = Field(default=0.0, ge=0)
    unclipped_count: int | None = Field(
        default=None, ge=0, description="secure rounds with adaptive clipping: how many of the "
                                        "contributors' updates were within the clip norm (unmasked sum)")
    contributions: dict[Identifier, NonNegativeFloat] = Field(
        default_factory=dict, max_length=MAX_MEMBERS,
        description="per contributor: examples x max(0, cosine of its update to the median update), "
                    "or its examples when updates were not scored (secure rounds, too few updates)")
    worker: str = ""


class PrivacyReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    level: PrivacyLevelName
    mechanism: str
    noise_std: FiniteFloat = 0.0
    epsilon_spent: FiniteFloat = 0.0
    delta: FiniteFloat = 0.0
    note: str = ""


class ModelReleased(Message):
    type: Literal["model_released"] = "model_released"
    training_id: Identifier
    round: int = Field(ge=0)
    parent_version: int | None = Field(default=None, ge=0)
    model_digest: Digest
    state_digest: Digest | None = None
    contributors: list[Identifier] = Field(default_factory=list)
    num_examples: int = Field(default=0, ge=0)
    algorithm: str = ""
    privacy: PrivacyReport
    unclipped_count: int | None = Field(default=None, ge=0, description="as in AggregateReady")
    update_norm_mean: NonNegativeFloat = Field(default=0.0, description="as in AggregateReady")
    contributions: dict[Identifier, NonNegativeFloat] = Field(
        default_factory=dict, max_length=MAX_MEMBERS, description="as in AggregateReady")


class VersionRecord(BaseModel):
    """A committed version: its lineage, where it is stored, and how it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    training_id: str
    version: int
    round: int
    parent_version: int | None
    model_digest: str
    state_digest: str | None
    checkpoint: str
    algorithm: str
    contributors: list[str]
    num_examples: int
    privacy: PrivacyReport
    created_at: float
    pruned_at: float | None = None
    """When the retention policy deleted the checkpoint (the record and lineage stay)."""
    metrics: dict[str, float] | None = None
    """The version's federated evaluation (``accuracy``, ``loss``), joined from the training's
    round metrics when the lineage is read; never stored (it is known only a round later)."""


class VersionCommitted(Message):
    type: Literal["version_committed"] = "version_committed"
    training_id: Identifier
    version: int = Field(ge=0)
    round: int = Field(ge=0)
    parent_version: int | None = None
    model_digest: Digest
    state_digest: Digest | None = None


# -- events ---------------------------------------------------------------------


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class RoundFigures(BaseModel):
    """What one completed round produced (the data of a ``round_completed`` event)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int
    attempts: int
    participants: int
    selected: int
    num_examples: int
    train_loss: float | None
    train_accuracy: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    eval_of_version: int | None
    upload_bytes: int = 0
    dense_bytes: int = 0
    server_accuracy: float | None = None
    """Accuracy of ``version`` on the server-side validation set, when the training has one."""
    server_loss: float | None = None
    clip_norm: float | None = None
    """The clip norm agents applied in this round (it moves under adaptive clipping)."""
    update_norm_mean: float | None = None
    """Mean L2 norm of the round's update deltas (None when they were not scored)."""
    round_seconds: float
    aggregation_seconds: float
    epsilon_spent: float
    completed_at: float


class RoundMetrics(RoundFigures):
    """One completed round, as the coordinator records it."""

    training_id: str
    round: int


M = TypeVar("M", bound=BaseModel)

_control: TypeAdapter[ControlCommand] = TypeAdapter(ControlCommand)
_agent: TypeAdapter[AgentMessage] = TypeAdapter(AgentMessage)


class MalformedMessage(ValueError):
    """A stream entry that is not a valid message; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


StreamFields: TypeAlias = "dict[FieldT, EncodableT]"
"""An entry's fields as redis-py's ``xadd`` takes them (one field: the message's JSON)."""


def encode(message: BaseModel) -> StreamFields:
    """Stream fields for ``message``."""
    return {PAYLOAD_FIELD: message.model_dump_json().encode()}


def _payload(fields: dict[bytes, bytes]) -> bytes:
    raw = fields.get(PAYLOAD_FIELD)
    if raw is None:
        raise MalformedMessage(f"entry has no '{PAYLOAD_FIELD.decode()}' field")
    return raw


def _short(exc: Exception) -> str:
    return str(exc).replace("\n", " ")[:500]


def decode(model: type[M], fields: dict[bytes, bytes]) -> M:
    """Parse stream fields into ``model``; raise :class:`MalformedMessage` with the reason."""
    try:
        return model.model_validate_json(_payload(fields))
    except ValueError as exc:
        raise MalformedMessage(_short(exc)) from exc


def decode_control(fields: dict[bytes, bytes]) -> StartTraining | StopTraining | RollbackTraining:
    try:
        return _control.validate_json(_payload(fields))
    except ValueError as exc:
        raise MalformedMessage(_short(exc)) from exc


def decode_agent_message(fields: dict[bytes, bytes]) -> AgentJoined | Heartbeat | AgentLeft:
    try:
        return _agent.validate_json(_payload(fields))
    except ValueError as exc:
        raise MalformedMessage(_short(exc)) from exc
