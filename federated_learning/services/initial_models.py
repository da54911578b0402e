"""Version 0 of a training: a built-in preset, an uploaded model, or the first agent's parameters.

A preset is built from its seed; an uploaded model is copied from the organisation's model store;
a ``from_first_agent`` training waits in INITIALIZING and asks one live agent at a time for its
``get_parameters`` (a parameters task; the next agent is asked at once when the asked one has no
model and another was not asked yet, else after the round deadline) until one answers with a
usable model, which fixes the layout; an HTTP client's first sync offers its model the same way. Agents that later find the training's
model is not theirs say so (``ModelRefused``): the refusal is kept for the training's status,
reported as a ``model_refused`` event (an alert), and the agent counts as having answered.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from federated_learning.bus.blobs import BlobMissing
from federated_learning.coordination.selection import round_rng
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.models import initial_model
from federated_learning.protocol.banks import empty_bank_version
from federated_learning.protocol.keys import Keys
from federated_learning.protocol.messages import (
    FirstAgentModel,
    MalformedMessage,
    MemoryBankModel,
    ModelRefused,
    ModelReleased,
    PresetModel,
    PrivacyReport,
    Severity,
    Task,
    TaskKind,
    TrainingStatus,
    UpdateSubmitted,
    decode,
    encode,
)
from federated_learning.protocol.tensors import InvalidTensor, decode_layers, encode_layers, spec_of
from federated_learning.records.model_refusals import ModelRefusal, ModelRefusals
from federated_learning.records.models import check_user_model
from federated_learning.types import NamedLayers

if TYPE_CHECKING:
    from federated_learning.services.coordinator import Coordinator


class InitialModels:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self.refusals = ModelRefusals(coordinator.redis, coordinator.keys)

    @staticmethod
    def waits_for_agent(state: TrainingState) -> bool:
        return isinstance(state.config.model, FirstAgentModel) and not state.layer_spec

    async def model_bytes(self, state: TrainingState) -> bytes:
        """The initial model's safetensors bytes (preset or uploaded); raises ValueError with the reason."""
        spec = state.config.model
        if isinstance(spec, PresetModel):
            return encode_layers(initial_model(spec))
        if isinstance(spec, MemoryBankModel):
            return empty_bank_version(spec)
        assert not isinstance(spec, FirstAgentModel)
        if spec.digest is None:
            raise ValueError(f"model '{spec.model_id}' names no file (start the training through the REST "
                             "API or the Python client, which resolve model_id)")
        try:
            data = await self.c.ctx.blobs.get(spec.digest, owner=Keys.model_owner(state.org_id))
        except BlobMissing as exc:
            raise ValueError(f"model '{spec.model_id}' is not stored for organisation '{state.org_id}'") from exc
        return data

    async def publish(self, state: TrainingState, data: bytes, layers: NamedLayers | None = None) -> None:
        """Make ``data`` version 0: store it, fix the layout, hand it to the version manager.
        ``layers``: ``data`` already checked; else it is checked here (InvalidTensor)."""
        if layers is None:
            spec = state.config.model
            layers = (decode_layers(data, max_bytes=self.c.settings.max_blob_bytes)
                      if isinstance(spec, MemoryBankModel)  # an empty bank: nothing to train, by design
                      else check_user_model(data, max_bytes=self.c.settings.max_blob_bytes))
        digest = await self.c.ctx.blobs.put(data)
        state.layer_spec = dict(spec_of(layers))
        state.phase, state.selected, state.deadline_at = RoundPhase.IDLE, [], 0.0
        release = ModelReleased(
            training_id=state.training_id, round=0, model_digest=digest,
            algorithm=state.config.algorithm,
            privacy=PrivacyReport(level="none", mechanism="none", note="initial model"),
        )
        async with self.c.redis.pipeline(transaction=True) as pipe:
            self.c.store.stage_save(pipe, state, active=True)
            pipe.xadd(self.c.keys.release_stream, encode(release))
            await pipe.execute()

    async def ask_next_agent(self, state: TrainingState) -> None:
        """Ask one live agent of the training's project for its parameters, when nobody is being
        asked or the last one let its deadline pass."""
        if state.phase is RoundPhase.COLLECTING and time.time() <= state.deadline_at:
            return
        registry = self.c.registry
        candidates = await registry.eligible(state.config.dataset, state.project)
        fresh = [agent for agent in candidates if agent not in state.selected] or candidates
        if not fresh:
            if state.reason != AWAITING_AGENTS:
                state.reason = AWAITING_AGENTS
                await self.c.store.save(state)
            return
        state.attempt += 1
        agent = fresh[round_rng(state.training_id, 0, state.attempt).randrange(len(fresh))]
        state.selected = sorted({*state.selected, agent})
        state.phase = RoundPhase.COLLECTING
        state.deadline_at = time.time() + state.round_deadline_s
        state.reason = f"waiting for the parameters of agent {agent} (the first agent's model fixes the layout)"
        task = Task(kind=TaskKind.PARAMETERS, training_id=state.training_id, round=0, attempt=state.attempt,
                    dataset=state.config.dataset, model=state.config.model, model_digest=None,
                    model_version=0, settings=state.config.local, deadline_at=state.deadline_at)
        async with self.c.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.c.keys.inbox_stream(agent), encode(task))
            self.c.store.stage_save(pipe, state)
            await pipe.execute()
        await self.c.ctx.emit("parameters_requested", state.reason, training_id=state.training_id,
                              round=0, agent_id=agent)

    async def on_parameters(self, state: TrainingState, notice: UpdateSubmitted, *, volunteer: bool) -> None:
        """A first agent's parameters: version 0 when the training still waits for them. Bus agents
        answer when asked; HTTP clients (volunteers) offer their model with their first sync."""
        if not self.waits_for_agent(state) or state.status is not TrainingStatus.INITIALIZING:
            return  # another agent's parameters came first: nothing to do
        if not volunteer and notice.agent_id not in state.selected:
            await self.c.ctx.reject("updates", "not_selected", "parameters from an agent that was not asked",
                                    training_id=state.training_id, round=0, agent_id=notice.agent_id)
            return
        assert notice.update_digest is not None
        try:
            data = await self.c.ctx.blobs.get(notice.update_digest, owner=notice.agent_id)
            layers = check_user_model(data, max_bytes=self.c.settings.max_blob_bytes)
        except (BlobMissing, InvalidTensor) as exc:
            reason, detail = (exc.reason, exc.detail) if isinstance(exc, InvalidTensor) else ("blob_missing", str(exc))
            await self.record_refusal(state, notice.agent_id, reason,
                                      f"the parameters of agent {notice.agent_id} cannot be a model: {detail}",
                                      source="coordinator")
            await self.asked_agent_failed(state, notice.agent_id, notice.attempt)
            return
        state.reason = ""
        await self.publish(state, data, layers)
        await self.c.ctx.emit("model_layout_fixed", f"agent {notice.agent_id}'s parameters are version 0: "
                              f"{len(state.layer_spec)} layers", training_id=state.training_id, round=0,
                              agent_id=notice.agent_id, layers=len(state.layer_spec))
        await self.c._emit_status(state)

    async def on_refused(self, fields: dict[bytes, bytes]) -> None:
        """An agent cannot train the training's model: keep the reason where the operator looks."""
        try:
            refused = decode(ModelRefused, fields)
        except MalformedMessage as exc:
            await self.c.ctx.reject("updates", "malformed", exc.reason)
            return
        sender = await self.c.check_sender(refused, {"training_id": refused.training_id, "round": refused.round,
                                                     "agent_id": refused.agent_id})
        if sender is None:
            return
        state, _agent = sender
        if state.status.is_final:
            return
        await self.record_refusal(state, refused.agent_id, refused.reason, refused.detail, source="agent")
        if self.waits_for_agent(state):
            await self.asked_agent_failed(state, refused.agent_id, refused.attempt)
        elif state.is_buffered and refused.agent_id in state.in_flight:
            # Its slot goes to another agent at the next refill, not at the task's deadline.
            state.in_flight.pop(refused.agent_id, None)
            state.in_flight_attempt.pop(refused.agent_id, None)
            await self.c.store.save(state)
        elif refused.round == state.round and refused.agent_id in state.selected \
                and refused.agent_id not in state.responded:
            state.responded.append(refused.agent_id)
            await self.c.store.save(state)
            await self.c.advance(state)

    async def asked_agent_failed(self, state: TrainingState, agent_id: str, attempt: int) -> None:
        """The agent asked for parameters has none to give (or gave unusable ones): ask another one
        now if some live agent has not been asked yet; otherwise the round deadline paces the
        next try, so agents that all refuse are not asked in a tight loop."""
        if state.phase is not RoundPhase.COLLECTING or attempt != state.attempt or agent_id not in state.selected:
            return
        registry = self.c.registry
        candidates = await registry.eligible(state.config.dataset, state.project)
        if any(agent not in state.selected for agent in candidates):
            state.phase = RoundPhase.IDLE
            await self.ask_next_agent(state)

    async def record_refusal(self, state: TrainingState, agent_id: str, reason: str, detail: str, *,
                             source: str) -> None:
        """Keep the refusal and report it once per (agent, reason): an agent asked every round
        does not raise an event every round."""
        if await self.refusals.add(state.training_id, ModelRefusal(agent_id=agent_id, reason=reason,
                                                                   detail=detail, source=source)):
            await self.c.ctx.emit("model_refused", detail, severity=Severity.WARNING,
                                  training_id=state.training_id, round=state.round, agent_id=agent_id,
                                  reason=reason)


AWAITING_AGENTS = "waiting for a live agent to give its parameters (the first agent's model fixes the layout)"
