"""What the coordinator's state machine is fed: a bus message, a clock tick, or what a
follow-up read (see :mod:`federated_learning.coordination.effects`). Frozen values; the
shell builds them, :func:`federated_learning.coordination.machine.step` consumes them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from federated_learning.protocol.messages import (
    ModelRefused,
    ModelReleased,
    RollbackTraining,
    SecureAggregationSpec,
    TrainingStatus,
    UpdateRefused,
    UpdateSubmitted,
    VersionCommitted,
    VersionRecord,
)
from federated_learning.protocol.secure_messages import (
    SecureAgentMessage,
    SecureKeysAdvertised,
    SecureSharesSubmitted,
)
from federated_learning.versioning.rollback import VersionScore


@dataclass(frozen=True)
class RoundCandidates:
    """Who could be asked to open ``round``, as the registry says now."""

    round: int
    retry: bool
    candidates: tuple[str, ...]
    """Live agents of the training's project holding its dataset."""
    available: tuple[str, ...]
    """Of those, the ones under the training's hourly task cap."""
    volunteers: tuple[str, ...]
    """Live volunteers (plain-HTTP clients): never asked, but they count."""
    accepted: frozenset[str]
    """Agents whose update for ``round`` is already accepted (a retry keeps them)."""
    weights: Mapping[str, float] | None = None
    """The selection policy's scores; None for uniform selection."""


@dataclass(frozen=True)
class NoticeArrived:
    """A signed update notice from a registered agent of the training's project."""

    notice: UpdateSubmitted
    entry_id: str
    volunteer: bool


@dataclass(frozen=True)
class UpdateRefusedBy:
    """The aggregator found an accepted update invalid; ``accepted``: the agent's accepted notice of
    that round as the shell read it (None when there is none any more)."""

    refusal: UpdateRefused
    accepted: UpdateSubmitted | None


@dataclass(frozen=True)
class NoticeChecked:
    """A notice the round can take, after the shell checked its blob (``problem``: why not)."""

    notice: UpdateSubmitted
    entry_id: str
    problem: tuple[str, str] | None


@dataclass(frozen=True)
class BufferCandidates:
    """Buffered trainings: the live eligible agents; ``open_buffer``: the buffer to open first."""

    candidates: tuple[str, ...]
    open_buffer: int | None = None


@dataclass(frozen=True)
class BufferTallied:
    """Buffered trainings: updates in the open buffer."""

    updates: int


@dataclass(frozen=True)
class RoundTallied:
    """A collecting round's count of accepted updates, and its live volunteers."""

    accepted: int
    volunteers: tuple[str, ...]


@dataclass(frozen=True)
class RoundUpdates:
    """The accepted notices of the round being closed, and what its job needs besides."""

    notices: tuple[UpdateSubmitted, ...]
    bases: Mapping[int, str] = field(default_factory=dict)
    """Model digest of each older version an update was trained from (volunteers, FedBuff)."""
    secure: SecureAggregationSpec | None = None


@dataclass(frozen=True)
class SecureMessageArrived:
    """A signed secure-exchange message from a registered agent of the training's project;
    ``key_owners``: for advertised keys, the agent that advertised each earlier in the session."""

    message: SecureAgentMessage
    key_owners: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureTallied:
    """Answers stored for the secure exchange's current phase."""

    arrived: int


@dataclass(frozen=True)
class KeysCollected:
    advertised: tuple[SecureKeysAdvertised, ...]
    session_id: str
    """A fresh random id for the session (the shell draws it: the machine stays deterministic)."""


@dataclass(frozen=True)
class SharesCollected:
    submissions: tuple[SecureSharesSubmitted, ...]


@dataclass(frozen=True)
class UploadersCollected:
    uploaders: tuple[str, ...]


@dataclass(frozen=True)
class AggregationOverdue:
    """The round's aggregation deadline passed without a version."""


@dataclass(frozen=True)
class VersionArrived:
    committed: VersionCommitted


@dataclass(frozen=True)
class RoundResults:
    """What the committed round produced: its notices, its privacy release, the server's score."""

    committed: VersionCommitted
    notices: tuple[UpdateSubmitted, ...]
    release: ModelReleased | None
    server: tuple[float, float] | None
    """(accuracy, loss) on the training's server-side validation set."""


@dataclass(frozen=True)
class VersionsScored:
    """Each evaluated version's score so far (the automatic rollback policy judges them)."""

    scores: tuple[VersionScore, ...]
    eval_accuracy: float | None
    """The completed round's federated evaluation accuracy (decides the target accuracy)."""


@dataclass(frozen=True)
class RollbackTarget:
    """The version a rollback after a round goes to (None: it does not exist)."""

    record: VersionRecord | None
    reason: str
    automatic: bool
    eval_accuracy: float | None


@dataclass(frozen=True)
class RollbackRequested:
    """An operator's rollback (``request_id``: its control entry), with the target's record."""

    command: RollbackTraining
    request_id: str
    record: VersionRecord | None


@dataclass(frozen=True)
class EvaluationReported:
    notices: tuple[UpdateSubmitted, ...]


@dataclass(frozen=True)
class ParameterCandidates:
    """Live agents that could give a ``from_first_agent`` training its parameters."""

    candidates: tuple[str, ...]
    after_refusal: bool = False
    """The asked agent had none: ask the next at once (only while some live agent was not asked)."""


@dataclass(frozen=True)
class ParametersArrived:
    notice: UpdateSubmitted
    volunteer: bool


@dataclass(frozen=True)
class ParametersUnusable:
    """The asked agent's parameters could not be a model (its refusal is kept by the shell)."""

    agent_id: str
    attempt: int


@dataclass(frozen=True)
class InitialModelStored:
    """Version 0 is stored as ``digest`` with this layout; ``from_agent``: the agent whose
    parameters it is (None: a preset, an uploaded model or an empty bank)."""

    digest: str
    layer_spec: Mapping[str, tuple[tuple[int, ...], str]]
    from_agent: str | None = None


@dataclass(frozen=True)
class ModelRefusedBy:
    """An agent said the training's model is not the model it trains (kept by the shell)."""

    refused: ModelRefused


@dataclass(frozen=True)
class FinishRequested:
    status: TrainingStatus
    reason: str


@dataclass(frozen=True)
class AgentsAlive:
    """The agents with a live heartbeat (a collecting round reports who dropped out)."""

    alive: frozenset[str]


Input = (RoundCandidates | NoticeArrived | NoticeChecked | UpdateRefusedBy | BufferCandidates | BufferTallied | SecureMessageArrived
         | SecureTallied | KeysCollected | SharesCollected | UploadersCollected | RoundTallied | RoundUpdates | AggregationOverdue
         | VersionArrived | RoundResults | VersionsScored | RollbackTarget | RollbackRequested | EvaluationReported | ParameterCandidates | ParametersArrived | ParametersUnusable
         | InitialModelStored | ModelRefusedBy | FinishRequested | AgentsAlive)
