"""Version 0 of a training as transitions of the coordinator's state machine.

A preset is built from its seed and an uploaded model copied from the organisation's store
(the shell does both, then steps ``InitialModelStored``). A ``from_first_agent`` training
waits in INITIALIZING and asks one live agent at a time for its ``get_parameters`` (a
parameters task; the next agent is asked at once when the asked one has no model and another
was not asked yet, else after the round deadline) until one answers with a usable model,
which fixes the layout; an HTTP client's first sync offers its model the same way. Agents
that later find the training's model is not theirs say so (``ModelRefused``): the shell keeps
the reason for the training's status, and the agent counts as having answered.
"""

from __future__ import annotations

from federated_learning.coordination.effects import (
    AskForParameters,
    CheckParameters,
    Effect,
    Emit,
    Reject,
    ReleaseModel,
    Save,
    SendTasks,
    StatusChanged,
    TallyRound,
)
from federated_learning.coordination.inputs import (
    InitialModelStored,
    ModelRefusedBy,
    ParameterCandidates,
    ParametersArrived,
    ParametersUnusable,
)
from federated_learning.coordination.selection import round_rng
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.protocol.messages import (
    FirstAgentModel,
    ModelReleased,
    PrivacyReport,
    Task,
    TaskKind,
    TrainingStatus,
)

Transition = tuple[TrainingState, list[Effect]]

AWAITING_AGENTS = "waiting for a live agent to give its parameters (the first agent's model fixes the layout)"


def waits_for_agent(state: TrainingState) -> bool:
    return isinstance(state.config.model, FirstAgentModel) and not state.layer_spec


def ask_for_parameters(state: TrainingState, given: ParameterCandidates, now: float) -> Transition:
    """Ask one live agent of the training's project for its parameters, when nobody is being
    asked or the last one let its deadline pass (or, after a refusal, at once while some live
    agent was not asked yet)."""
    if not waits_for_agent(state) or state.status is not TrainingStatus.INITIALIZING:
        return state, []
    if given.after_refusal:
        if not any(agent not in state.selected for agent in given.candidates):
            return state, []  # the round deadline paces the next try: no tight loop over refusals
    elif state.phase is RoundPhase.COLLECTING and now <= state.deadline_at:
        return state, []
    fresh = [agent for agent in given.candidates if agent not in state.selected] or list(given.candidates)
    if not fresh:
        if state.reason == AWAITING_AGENTS:
            return state, []
        state.reason = AWAITING_AGENTS
        return state, [Save()]
    state.attempt += 1
    agent = fresh[round_rng(state.training_id, 0, state.attempt).randrange(len(fresh))]
    state.selected = sorted({*state.selected, agent})
    state.phase = RoundPhase.COLLECTING
    state.deadline_at = now + state.round_deadline_s
    state.reason = f"waiting for the parameters of agent {agent} (the first agent's model fixes the layout)"
    task = Task(kind=TaskKind.PARAMETERS, training_id=state.training_id, round=0, attempt=state.attempt,
                dataset=state.config.dataset, model=state.config.model, model_digest=None,
                model_version=0, settings=state.config.local, deadline_at=state.deadline_at)
    return state, [SendTasks(((agent, task),)), Save(),
                   Emit("parameters_requested", state.reason, agent_id=agent)]


def screen_parameters(state: TrainingState, given: ParametersArrived) -> Transition:
    """A first agent's parameters: checked when the training still waits for them. Bus agents
    answer when asked; HTTP clients (volunteers) offer their model with their first sync."""
    notice = given.notice
    if not waits_for_agent(state) or state.status is not TrainingStatus.INITIALIZING:
        return state, []  # another agent's parameters came first: nothing to do
    if not given.volunteer and notice.agent_id not in state.selected:
        return state, [Reject("updates", "not_selected", "parameters from an agent that was not asked",
                              state.training_id, 0, notice.agent_id)]
    return state, [CheckParameters(notice)]


def parameters_unusable(state: TrainingState, given: ParametersUnusable) -> Transition:
    """The asked agent has no model to give (or gave an unusable one): ask another one now if
    some live agent has not been asked yet."""
    if state.phase is not RoundPhase.COLLECTING or given.attempt != state.attempt \
            or given.agent_id not in state.selected:
        return state, []
    return state, [AskForParameters(after_refusal=True)]


def adopt_initial_model(state: TrainingState, given: InitialModelStored) -> Transition:
    """The model is stored: fix the layout and hand it to the version manager as version 0."""
    state.status = TrainingStatus.INITIALIZING
    state.layer_spec = dict(given.layer_spec)
    state.phase, state.selected, state.deadline_at = RoundPhase.IDLE, [], 0.0
    state.reason = ""
    release = ModelReleased(training_id=state.training_id, round=0, model_digest=given.digest,
                            algorithm=state.config.algorithm,
                            privacy=PrivacyReport(level="none", mechanism="none", note="initial model"))
    effects: list[Effect] = [Save(active=True), ReleaseModel(release)]
    if given.from_agent is not None:
        effects.append(Emit("model_layout_fixed", f"agent {given.from_agent}'s parameters are version 0: "
                            f"{len(state.layer_spec)} layers", agent_id=given.from_agent,
                            data={"layers": len(state.layer_spec)}))
    return state, [*effects, StatusChanged(state.status, state.reason, state.round)]


def model_refused(state: TrainingState, given: ModelRefusedBy) -> Transition:
    """An agent cannot train the training's model: it counts as having answered."""
    refused = given.refused
    if state.status.is_final:
        return state, []
    if waits_for_agent(state):
        return parameters_unusable(state, ParametersUnusable(refused.agent_id, refused.attempt))
    if state.is_buffered and refused.agent_id in state.in_flight:
        # Its slot goes to another agent at the next refill, not at the task's deadline.
        state.in_flight.pop(refused.agent_id, None)
        state.in_flight_attempt.pop(refused.agent_id, None)
        return state, [Save()]
    if refused.round == state.round and refused.agent_id in state.selected \
            and refused.agent_id not in state.responded:
        state.responded.append(refused.agent_id)
        return state, [Save(), TallyRound()]
    return state, []
