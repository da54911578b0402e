"""What the coordinator's state machine asks its shell to do, as frozen values.

:func:`federated_learning.coordination.machine.step` never touches Redis: it returns the
training's new state and a list of these. The shell (``services/rounds.py``) writes the
*staged* ones (tasks, accepted updates, jobs, metrics, the state itself) in one MULTI/EXEC,
then publishes the *notices* (events, rejections), then runs the *follow-ups*, which read
what the next step needs (the registry, a round's accepted notices, a committed version's
results) and feed it back to ``step`` as an event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel

from federated_learning.protocol.messages import (
    AggregationJob,
    ModelReleased,
    RoundMetrics,
    Severity,
    Task,
    TrainingStatus,
    UpdateSubmitted,
    VersionCommitted,
)
from federated_learning.protocol.secure_messages import SecureAgentMessage

# -- staged: written together with the state, in one transaction ------------------


@dataclass(frozen=True)
class Save:
    """Write the training's state; ``active`` moves it in or out of the active set."""

    active: bool | None = None


@dataclass(frozen=True)
class SendTasks:
    """Put each task in its agent's inbox, and count it in the agent's statistics."""

    tasks: tuple[tuple[str, Task], ...]


@dataclass(frozen=True)
class AcceptUpdate:
    """Record the notice as the agent's update of ``round`` (a buffer number in buffered
    trainings), once: ``entry_id`` marks it."""

    notice: UpdateSubmitted
    entry_id: str
    round: int


@dataclass(frozen=True)
class RevokeUpdate:
    """The aggregator refused the agent's accepted update of ``round``: take back its counts and,
    with ``withdraw`` (the round still collects), the update itself, so the agent may send another."""

    notice: UpdateSubmitted
    round: int
    withdraw: bool


@dataclass(frozen=True)
class SendMessages:
    """Put secure-exchange messages (roster, delivered shares, unmask requests) in inboxes."""

    messages: tuple[tuple[str, BaseModel], ...]


@dataclass(frozen=True)
class StoreSecureMessage:
    """Keep an agent's message of the current secure phase (once per agent; the shell files it
    under the round's session attempt), and the advertised public keys' owner."""

    message: SecureAgentMessage


@dataclass(frozen=True)
class ClearRoundUpdates:
    """Forget the round's accepted updates (a new secure session, an operator's rollback)."""

    round: int


@dataclass(frozen=True)
class ReleaseModel:
    """Hand a model to the version manager (version 0 goes this way, as an un-noised release)."""

    release: ModelReleased


@dataclass(frozen=True)
class RecordOutcome:
    """Whether an asked agent delivered (the monitor's failure-rate rule reads these)."""

    agent_id: str
    completed: bool


@dataclass(frozen=True)
class WriteJob:
    job: AggregationJob


@dataclass(frozen=True)
class AppendMetrics:
    """A completed round's figures, and the agents' contributions to it."""

    metrics: RoundMetrics
    contributions: Mapping[str, float] = field(default_factory=dict)


# -- notices: published after the transaction -------------------------------------


@dataclass(frozen=True)
class Emit:
    kind: str
    message: str
    severity: Severity = Severity.INFO
    agent_id: str | None = None
    data: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Reject:
    """An input refused with its reason: counted and reported, nothing else changes."""

    source: str
    reason: str
    detail: str
    training_id: str
    round: int | None = None
    agent_id: str | None = None
    severity: Severity = Severity.WARNING


@dataclass(frozen=True)
class CountLate:
    """An update that came just after its round closed (over-selection makes that normal)."""

    notice: UpdateSubmitted
    detail: str


@dataclass(frozen=True)
class RolledBack:
    """An earlier version became current (a ``rollback`` event, counted by trigger)."""

    from_version: int | None
    to_version: int
    reason: str
    automatic: bool


@dataclass(frozen=True)
class DiscardUploads:
    """The committed round's uploads: nobody reads them again."""

    notices: tuple[UpdateSubmitted, ...]


# -- follow-ups: need a read, then step again -------------------------------------


@dataclass(frozen=True)
class OpenRound:
    """Select agents for ``round`` (from the live registry) and send their tasks."""

    round: int
    retry: bool = False


@dataclass(frozen=True)
class CheckUpdate:
    """Look for the agent's accepted update of ``round`` and check the update's blob, then step
    ``NoticeChecked`` (a redelivery of the accepted entry is dropped silently)."""

    notice: UpdateSubmitted
    entry_id: str
    round: int


@dataclass(frozen=True)
class Refill:
    """Buffered trainings: read the eligible agents, then step ``BufferCandidates``."""


@dataclass(frozen=True)
class TallyBuffer:
    """Buffered trainings: count the open buffer's updates, then step ``BufferTallied``."""


@dataclass(frozen=True)
class TallyRound:
    """Count the round's accepted updates and live volunteers, then step ``RoundTallied``."""


@dataclass(frozen=True)
class CloseRound:
    """Read the round's accepted notices (and what the job needs), then step ``RoundUpdates``."""


@dataclass(frozen=True)
class GatherResults:
    """Read what the committed round produced, then step ``RoundResults``."""

    committed: VersionCommitted


@dataclass(frozen=True)
class JudgeRollbacks:
    """Read the training's round metrics for the automatic rollback policy, then step
    ``VersionsScored`` with ``eval_accuracy`` (the completed round's, passed through)."""

    eval_accuracy: float | None


@dataclass(frozen=True)
class ReadVersion:
    """Read ``version``'s record to roll back to it, then step ``RollbackTarget``."""

    version: int
    reason: str
    automatic: bool
    eval_accuracy: float | None


@dataclass(frozen=True)
class GatherEvaluation:
    """Read the final evaluation round's reports, then step ``EvaluationReported``."""


@dataclass(frozen=True)
class TallySecure:
    """Count the answers of the secure exchange's current phase, then step ``SecureTallied``."""


@dataclass(frozen=True)
class CollectSecure:
    """Read what the completed secure phase produced (advertised keys, share submissions, the
    uploaders), then step ``KeysCollected``, ``SharesCollected`` or ``UploadersCollected``."""


@dataclass(frozen=True)
class AskForParameters:
    """Read the live eligible agents, then step ``ParameterCandidates``."""

    after_refusal: bool = False


@dataclass(frozen=True)
class CheckParameters:
    """Read and check an agent's parameters; store them and step ``InitialModelStored``, or
    keep the refusal and step ``ParametersUnusable``."""

    notice: UpdateSubmitted


@dataclass(frozen=True)
class ActivateQueued:
    """A slot may have freed: start queued trainings."""


@dataclass(frozen=True)
class StatusChanged:
    """Publish a ``training_status`` event: the status (and its reason) the training moved to."""

    status: TrainingStatus
    reason: str
    round: int
    severity: Severity = Severity.INFO


Staged = (Save | SendTasks | SendMessages | StoreSecureMessage | ClearRoundUpdates | AcceptUpdate | RevokeUpdate
          | RecordOutcome | ReleaseModel | WriteJob | AppendMetrics)
Notice = Emit | Reject | CountLate | RolledBack | DiscardUploads | StatusChanged
FollowUp = (OpenRound | CheckUpdate | Refill | TallyBuffer | TallyRound | CloseRound | GatherResults | JudgeRollbacks
            | ReadVersion | GatherEvaluation | TallySecure | CollectSecure | AskForParameters | CheckParameters
            | ActivateQueued)
Effect = Staged | Notice | FollowUp
