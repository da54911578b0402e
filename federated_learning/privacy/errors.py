"""Exceptions of the privacy library, each named after what happened."""

from __future__ import annotations


class PrivacyError(Exception):
    """Base class of the privacy library's errors."""


class BudgetExhausted(PrivacyError):
    """A release would spend more privacy budget than the target allows."""

    def __init__(self, spent_epsilon: float, target_epsilon: float, delta: float) -> None:
        self.spent_epsilon = spent_epsilon
        self.target_epsilon = target_epsilon
        self.delta = delta
        super().__init__(
            f"privacy budget exhausted: epsilon would reach {spent_epsilon:.6g} "
            f"at delta={delta:.3g}; target is {target_epsilon:.6g}"
        )


class CalibrationFailed(PrivacyError):
    """No noise multiplier meets the (epsilon, delta) target within the search range."""


class InsufficientSurvivors(PrivacyError):
    """Fewer agents than the secret-sharing threshold are left in a secure-aggregation stage."""

    def __init__(self, stage: str, survivors: int, threshold: int) -> None:
        self.stage = stage
        self.survivors = survivors
        self.threshold = threshold
        super().__init__(
            f"secure aggregation needs at least {threshold} agents at stage '{stage}'; "
            f"got {survivors}"
        )


class ProtocolViolation(PrivacyError):
    """A secure-aggregation message breaks the protocol (unknown sender, double request...)."""


class ShareDecryptionFailed(PrivacyError):
    """An encrypted secret share failed authentication (wrong key, sender or tampering)."""


class AggregationOverflow(PrivacyError):
    """The fixed-point encoding cannot hold the sum of this many agents modulo 2**32."""

    def __init__(self, num_agents: int, max_agents: int) -> None:
        self.num_agents = num_agents
        self.max_agents = max_agents
        super().__init__(
            f"fixed-point sum of {num_agents} agents overflows modulo 2**32; "
            f"this codec supports at most {max_agents}"
        )


class InvalidSignature(PrivacyError):
    """A signed notice does not verify against the agent's public key."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        super().__init__(f"signature of agent '{agent_id}' does not verify")
