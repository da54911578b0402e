"""Checks the coordinator applies to trainings and notices (pure; no I/O)."""

from __future__ import annotations

from typing import Protocol

from federated_learning.coordination.state import TrainingState
from federated_learning.privacy.signing import verify
from federated_learning.protocol.messages import (
    AgentJoined,
    AgentLeft,
    Heartbeat,
    MemoryBankModel,
    PresetModel,
    UpdateSubmitted,
)


class SignedMessage(Protocol):
    """A message an agent signs: an update notice, or a secure-aggregation message."""

    @property
    def signature(self) -> str | None: ...

    def signed_bytes(self) -> bytes: ...


def check_signature(notice: SignedMessage, public_key: str | None,
                    required: bool) -> tuple[str, str] | None:
    """Reason and detail when the notice's signature is missing or wrong, else None."""
    if public_key is None:
        return ("unsigned", "agent registered no public key") if required else None
    if notice.signature is None:
        return "unsigned", "message carries no signature"
    if not verify(bytes.fromhex(public_key), notice.signed_bytes(), bytes.fromhex(notice.signature)):
        return "bad_signature", "signature does not match the agent's registered key"
    return None


MAX_AGENT_MESSAGE_AGE_S = 120.0
"""Joins, heartbeats and leaves sent longer ago than this (by the agent's clock, against the
bus server's) are refused: a replayed heartbeat cannot keep a gone agent alive for long, and
an agent whose clock is off by more than this is told so."""


def check_agent_message(message: AgentJoined | Heartbeat | AgentLeft, registered_key: str | None,
                        received_at: float, max_age_s: float = MAX_AGENT_MESSAGE_AGE_S) -> tuple[str, str] | None:
    """Reason and detail when a join, heartbeat or leave must be refused, else None.

    A join is verified against the key it binds, heartbeats and leaves against the agent's
    registered key; an agent that registered no key has nothing to verify (and cannot send
    updates while signed updates are required).
    """
    key = message.public_key if isinstance(message, AgentJoined) else registered_key
    if key is None:
        return None
    problem = check_signature(message, key, True)
    if problem is not None:
        return problem
    age = received_at - message.sent_at
    if abs(age) > max_age_s:
        return ("stale_message", (f"{message.type} sent {age:+.0f}s from when the bus received it (more than "
                                 f"{max_age_s:.0f}s): a replay, or the agent's clock is off"))
    return None


def project_mismatch(agent_project: tuple[str, str], training_project: tuple[str, str]) -> str | None:
    """Why an agent of ``agent_project`` may not send updates into a training of
    ``training_project`` (both (organisation, project)); None when they are the same project."""
    if agent_project == training_project:
        return None
    return (f"agent belongs to project '{agent_project[1]}' of organisation '{agent_project[0]}'; the training "
            f"to project '{training_project[1]}' of organisation '{training_project[0]}'")


def minimum_updates(algorithm: str, num_malicious: int) -> int:
    """Fewest updates a round of ``algorithm`` can aggregate (Krum: 2f+3, Bulyan: 4f+3)."""
    if algorithm in ("krum", "multikrum"):
        return 2 * num_malicious + 3
    if algorithm == "bulyan":
        return 4 * num_malicious + 3
    return 1


CENTRAL_DP_ALGORITHMS = frozenset({"fedavg", "fedprox"})
"""Rules whose output's sensitivity to one agent the release calibrates (the weighted mean)."""


def strategy_params(state: TrainingState) -> dict[str, float | int | str]:
    """The aggregation rule's parameters: the training's, plus FedProx's mu from the local settings."""
    params = dict(state.config.algorithm_params)
    if state.config.algorithm == "fedprox":
        params.setdefault("proximal_mu", state.config.local.proximal_mu)
    return params


def refuse_training(state: TrainingState) -> str | None:
    """Why a training cannot run as configured, or None."""
    if state.privacy_level != "none" and state.config.privacy_mode == "central" and \
            state.config.algorithm not in CENTRAL_DP_ALGORITHMS:
        return (f"central differential privacy is calibrated for the example-weighted mean; algorithm "
                f"'{state.config.algorithm}' is refused with privacy level '{state.privacy_level}' "
                f"(use {' or '.join(sorted(CENTRAL_DP_ALGORITHMS))}, privacy_mode 'local', or level 'none')")
    refusal = _refuse_adaptive_clipping(state)
    if refusal is not None:
        return refusal
    if state.config.validation_data is not None and not isinstance(state.config.model, PresetModel):
        return ("validation_data scores each version with a built-in preset model; the server cannot run "
                "the training's own model (evaluate it on the agents, or download the versions)")
    if state.min_clients > state.clients_per_round:
        return (f"min_clients ({state.min_clients}) exceeds the clients per round "
                f"({state.clients_per_round}) allowed by max_clients_per_round")
    if state.config.kind == "memory_bank":
        return None  # its settings were checked with the request (MemoryBankModel, TrainingConfig)
    from federated_learning.aggregation import create_strategy

    try:
        strategy = create_strategy(state.config.algorithm, **strategy_params(state))
    except ValueError as exc:
        return f"algorithm '{state.config.algorithm}': {exc}"
    needed = minimum_updates(state.config.algorithm, int(getattr(strategy, "num_malicious_clients", 0)))
    if state.min_clients < needed:
        return (f"algorithm '{state.config.algorithm}' needs at least {needed} updates per round; "
                f"min_clients is {state.min_clients}")
    return None


def _refuse_adaptive_clipping(state: TrainingState) -> str | None:
    from federated_learning.privacy.release import (
        adaptive_count_noise_std,
        central_noise_multiplier,
        update_noise_multiplier,
    )

    count_noise_std = adaptive_count_noise_std(state)
    z = central_noise_multiplier(state)
    if count_noise_std is None or z is None:
        return None
    try:
        update_noise_multiplier(z, count_noise_std)
    except ValueError as exc:
        return str(exc)
    return None


def checked_whole_by_aggregator(state: TrainingState) -> bool:
    """Whether the training's updates are checked by their header at the coordinator and read
    whole (hash, values) only by the aggregator, as they are accepted (decision 0012): dense and
    compressed model updates. Memory banks and masked uploads are checked whole by the coordinator."""
    return not isinstance(state.config.model, MemoryBankModel) and \
        not (state.config.secure_aggregation and not state.is_buffered)


def notice_metrics(notice: UpdateSubmitted) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if notice.train_loss is not None:
        metrics["train_loss"] = notice.train_loss
    if notice.evaluation is not None:
        metrics["accuracy"] = notice.evaluation.accuracy
        metrics["loss"] = notice.evaluation.loss
    return metrics
