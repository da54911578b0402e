"""The tasks the coordinator sends agents: one per agent, on the training's current version."""

from __future__ import annotations

from federated_learning.coordination.state import TrainingState
from federated_learning.privacy.release import clip_norm_type, local_laplace_scale, local_noise_std
from federated_learning.protocol.messages import Task, TaskKind


def build_tasks(state: TrainingState, agents: list[str], kind: TaskKind, deadline_at: float
                ) -> tuple[tuple[str, Task], ...]:
    """One task per agent on the training's current version, with the round's local settings."""
    assert state.current_digest is not None and state.current_version is not None
    settings = state.config.local.model_copy(update={
        "clip_norm": state.clip_norm, "clip_norm_type": clip_norm_type(state),
        "local_noise_std": local_noise_std(state), "local_laplace_scale": local_laplace_scale(state)})
    return tuple((agent_id, Task(kind=kind, training_id=state.training_id, round=state.round,
                                 attempt=state.attempt, dataset=state.config.dataset, model=state.config.model,
                                 model_digest=state.current_digest, model_version=state.current_version,
                                 settings=settings, deadline_at=deadline_at,
                                 secure=state.secure is not None and kind is TaskKind.TRAIN))
                 for agent_id in agents)
