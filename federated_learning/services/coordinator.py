"""Coordinator: trainings, rounds, agent registry, selection, deadlines, retries.

A thin shell over :mod:`federated_learning.coordination`: every handler loads the
training's state from Redis, decides with pure functions, and writes the new
state together with its side effects (tasks, jobs) in one MULTI/EXEC, so a
restart at any moment resumes from a consistent state. Entries are acked only
after that write; a redelivered entry finds its effect already there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec

from prometheus_client import Gauge
from redis.exceptions import RedisError

from federated_learning.bus.blob_stores import publish_blob_store
from federated_learning.bus.consumer import StreamConsumer, run_consumers
from federated_learning.bus.lease import Lease
from federated_learning.bus.membership import Membership
from federated_learning.coordination.checks import check_agent_message, refuse_training
from federated_learning.coordination.initial import waits_for_agent
from federated_learning.coordination.inputs import InitialModelStored
from federated_learning.coordination.partitions import (
    Partition,
    preferred_holder,
    training_of_payload,
)
from federated_learning.coordination.secure import DEFAULT_SECURE_CLIP_NORM
from federated_learning.coordination.state import RoundPhase, TrainingState
from federated_learning.privacy.release import DEFAULT_ADAPTIVE_INITIAL_CLIP_NORM, clip_norm_for
from federated_learning.protocol.agents import AgentRecord
from federated_learning.protocol.keys import GROUP_FORWARDER, coordinator_group
from federated_learning.protocol.messages import (
    PAYLOAD_FIELD,
    AgentJoined,
    AgentLeft,
    Heartbeat,
    MalformedMessage,
    RollbackTraining,
    Severity,
    StartTraining,
    StopTraining,
    TaskKind,
    TrainingStatus,
    UpdateSubmitted,
    decode,
    decode_agent_message,
    decode_control,
)
from federated_learning.protocol.secure_messages import SECURE_AGENT_TYPES, message_type
from federated_learning.protocol.tensors import spec_of
from federated_learning.records.agents import AgentRegistry, entry_time
from federated_learning.records.model_refusals import ModelRefusals
from federated_learning.records.partitions import PartitionCountMismatch, pin_partition_count
from federated_learning.records.secure_exchange import SecureExchange
from federated_learning.records.trainings import TrainingStore
from federated_learning.records.versions import VersionIndex
from federated_learning.services.initial_models import check_initial_model, initial_model_bytes
from federated_learning.services.notice_batch import DuplicateFlags, NoticeBatch
from federated_learning.services.outbox import OutboxForwarder
from federated_learning.services.rounds import RoundProtocol
from federated_learning.services.runtime import ServiceContext, service_main
from federated_learning.types import BlobDigest

log = logging.getLogger(__name__)

P = ParamSpec("P")
Entries = list[tuple[bytes, dict[bytes, bytes]]]

TICK_S = 0.25
BLOB_SWEEP_S = 60.0
"""How often expired uploads are deleted from a blob folder (Redis expires its keys itself)."""
SLOT_CHECK_S = 10.0
"""How often a partition frees the slots its finished trainings still hold."""
CANCEL_AGAIN_S = 0.1
"""How long a cancelled helper task has to end before it is cancelled again."""
WANTED_FOR_RENEWALS = 3
"""How long a coordinator's claim to a partition assigned to it lasts unless renewed (it renews it
every renewal period while it waits)."""
TAKE_OVER_AFTER_RENEWALS = 2
"""A free partition assigned to another live coordinator is taken after this many renewal periods
(its own coordinator takes it within one)."""
UPDATE_NOTICE = UpdateSubmitted.model_fields["type"].default
NOTICES_PER_READ = 128
"""Entries read per stream at once; a read of the update stream is handled as one batch."""
FORWARDED_PER_READ = 1024
"""Outbox entries forwarded to the agents' inboxes in one transaction (a round's tasks, typically)."""

ALL_TRAININGS = Partition(0)
"""The one partition of a deployment whose trainings are not split."""

ACTIVE = Gauge("fl_trainings_active", "Trainings holding a slot")
ALIVE = Gauge("fl_agents_alive", "Agents with a live heartbeat")


async def _first_of(*events: asyncio.Event, then: asyncio.Event) -> None:
    """Set ``then`` once any of ``events`` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        then.set()
    finally:
        for wait in waits:
            wait.cancel()


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and return once all have ended: none outlives the process's connection, and
    a lease keeper cannot go on renewing. A task still running after ``CANCEL_AGAIN_S`` is cancelled
    again (on Python 3.11 an ``asyncio.wait_for``, in redis-py too, can lose a cancellation that
    meets a finishing call). If this task is cancelled meanwhile, it still waits, then re-raises."""
    cancelled = False
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        try:
            await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class Coordinator(RoundProtocol):
    """Runs the round protocol of the trainings of one partition (all of them, by default), while
    it holds that partition's lease; :class:`CoordinatorService` runs one per partition."""

    def __init__(self, ctx: ServiceContext, partition: Partition = ALL_TRAININGS,
                 membership: Membership | None = None) -> None:
        self.ctx = ctx
        self.keys = ctx.keys
        self.redis = ctx.redis
        self.settings = ctx.settings
        self.partition = partition
        self.membership = membership
        """The live coordinator processes, when several may share the partitions: a process
        takes the partitions assigned to it and hands back those it holds for another."""
        self.store = TrainingStore(ctx.redis, ctx.keys)
        # The registry's writer keeps the records it reads (they change only through its own joins);
        # the other partitions keep them for one read of the streams (see ``tick``).
        self.registry = AgentRegistry(ctx.redis, ctx.keys, ctx.settings.heartbeat_timeout_s,
                                      require_join_token=ctx.settings.require_join_token,
                                      max_first_joins_per_minute=ctx.settings.max_first_joins_per_minute,
                                      cache_records=True)
        self._last_tick = 0.0
        self._last_sweep = time.monotonic()
        self._last_slot_check = time.monotonic()
        self.version_index = VersionIndex(ctx.redis, ctx.keys)
        self.exchange = SecureExchange(ctx.redis, ctx.keys)
        self.refusals = ModelRefusals(ctx.redis, ctx.keys)
        self.states: dict[str, TrainingState] = {}
        self._stepping = asyncio.Lock()
        self.uploads_to_keep: list[tuple[BlobDigest, str | None]] = []
        holder = f"coordinator-{ctx.instance}"
        self.lease = Lease(ctx.redis, ctx.keys.coordinator_lease_of(partition.index, partition.count), holder,
                           ttl_s=ctx.settings.coordinator_lease_s)
        self.label = holder if partition.count == 1 else f"{holder} (partition {partition.name()})"
        # One read is handled stream by stream in this order: an agent's join before its first
        # update notice (an HTTP client joins and sends its update at once).
        handlers = {self.keys.control_stream: self._forgetting_on_failure(self._own(self.on_control))}
        batch_handlers: dict[str, Callable[[Entries], Awaitable[None]]] = {}
        if partition.keeps_registry:
            handlers[self.keys.agent_stream] = self.on_agent_message
            batch_handlers[self.keys.agent_stream] = self.on_agent_batch
        handlers[self.keys.update_stream] = self._forgetting_on_failure(self._own(self.on_upload))
        batch_handlers[self.keys.update_stream] = self._forgetting_on_failure(self._own_batch(self.on_upload_batch))
        # The versions and refusals of this partition's trainings come on its cell's streams
        # (``protocol/keys.py``); another cell's are read with a command of their own (a cluster
        # reads one hash slot per command), and so is the outbox that reaches the agents.
        cell = ctx.keys.in_cell(partition.index)
        cell_handlers = {
            cell.version_stream: self._forgetting_on_failure(self._own(self.on_version)),
            cell.refused_update_stream: self._forgetting_on_failure(self._own(self.on_update_refused)),
        }
        group = coordinator_group(partition.index, partition.count)
        options: dict[str, Any] = {"dead_letter_stream": ctx.dead_letter_stream, "block_ms": int(TICK_S * 1000),
                                   "claim_idle_ms": ctx.settings.claim_idle_ms, "on_forged_id": ctx.forged_stream_id}
        if cell.cell == 0:
            handlers |= cell_handlers
        self.consumer = StreamConsumer(ctx.redis, group, holder, handlers, batch_handlers=batch_handlers,
                                       count=NOTICES_PER_READ, **options)
        self.consumers = [self.consumer]
        if cell.cell != 0:
            forwarder = OutboxForwarder(ctx.redis, cell)
            self.consumers += [
                StreamConsumer(ctx.redis, group, holder, cell_handlers, **options),
                StreamConsumer(ctx.redis, GROUP_FORWARDER, holder, {cell.outbox_stream: forwarder.forward},
                               batch_handlers={cell.outbox_stream: forwarder.forward_batch},
                               count=FORWARDED_PER_READ, **options),
            ]

    async def run(self, *, burst: bool = False) -> None:
        """Work while holding this partition's lease; stand by (or stand by again) without it."""
        if self.partition.keeps_registry:
            await publish_blob_store(self.redis, self.keys, self.ctx.blobs)
        while not self.ctx.stop.is_set():
            if not await self._wait_for_lease():
                break
            lost = asyncio.Event()
            keeper = asyncio.create_task(self.lease.keep(lost, self.ctx.stop))
            handing_back = asyncio.Event()
            helpers = [keeper, asyncio.create_task(self._hand_back_once_assigned_elsewhere(handing_back))]
            working = asyncio.Event()
            helpers.append(asyncio.create_task(_first_of(self.ctx.stop, lost, handing_back, then=working)))
            try:
                self.forget_states()  # another coordinator may have worked meanwhile
                if self.partition.keeps_registry:
                    self.registry.forget_records()
                    await self.registry.index_volunteers()
                    await self.store.publish_missing_views()
                await self.store.release_finished_slots(self.partition.owns)
                await run_consumers(self.consumers, working, burst=burst,
                                    on_idle=self._forgetting_on_failure(self.tick))
            finally:
                await _cancel_and_wait(helpers)
                if self.partition.keeps_registry:  # the next holder reports them
                    ACTIVE.set(0)
                    ALIVE.set(0)
            if burst:
                break
            if self.ctx.stop.is_set():
                continue
            if handing_back.is_set() and not lost.is_set():
                log.info("coordinator %s hands its partition over to %s", self.label, self._assigned_holder())
                await self._release_lease()
            else:
                log.warning("coordinator %s lost its lease; standing by", self.label)
        if self.lease.valid():
            await self._release_lease()

    async def _release_lease(self) -> None:
        try:
            await asyncio.wait_for(self.lease.release(), 1.0)
        except Exception as exc:  # noqa: BLE001 - a lost bus: the lease expires anyway
            log.info("releasing the lease failed: %s", exc)

    def _assigned_holder(self) -> str | None:
        """The live coordinator this partition is assigned to (None: any may take it)."""
        if self.membership is None:
            return None
        return preferred_holder(self.membership.members, self.partition.index)

    async def _hand_back_once_assigned_elsewhere(self, handing_back: asyncio.Event) -> None:
        """Set ``handing_back`` once the partition is assigned to another live coordinator (one that
        started, or came back, after this one took it) which says it is waiting for it: a process
        that signs in but does not take its partitions (a hung one) gets none handed to it."""
        wanted = self.keys.coordinator_wanted(self.partition.index, self.partition.count)
        while True:
            await asyncio.sleep(self.lease.renew_every_s)
            assigned = self._assigned_holder()
            if assigned is not None and assigned != self.lease.holder \
                    and await self.redis.get(wanted) == assigned.encode():
                handing_back.set()
                return

    async def _wait_for_lease(self) -> bool:
        """Take the lease, waiting as a standby while another coordinator holds it or the partition
        is assigned to another live coordinator (which then has ``TAKE_OVER_AFTER_RENEWALS``
        renewal periods to take it up); False on stop."""
        announced = False
        free_since: float | None = None
        while not self.ctx.stop.is_set():
            try:
                assigned = self._assigned_holder()
                take = assigned in (None, self.lease.holder)
                if take and assigned is not None:  # the holder hands it over once it sees this
                    await self.redis.set(self.keys.coordinator_wanted(self.partition.index, self.partition.count),
                                         self.lease.holder, px=int(WANTED_FOR_RENEWALS * self.lease.renew_every_s * 1000))
                if not take:
                    if await self.redis.exists(self.lease.key):
                        free_since = None
                    else:
                        free_since = free_since or time.monotonic()
                        take = time.monotonic() - free_since >= TAKE_OVER_AFTER_RENEWALS * self.lease.renew_every_s
                if take and await self.lease.acquire():
                    log.info("coordinator %s holds the lease", self.label)
                    return True
            except (OSError, RedisError) as exc:
                log.warning("taking the lease failed: %s", exc)
            if not announced:
                log.info("coordinator %s stands by: another coordinator holds the lease", self.label)
                announced = True
            try:
                async with asyncio.timeout(self.lease.renew_every_s):
                    await self.ctx.stop.wait()
            except TimeoutError:
                continue
        return False

    def _is_mine(self, fields: dict[bytes, bytes]) -> bool:
        return self.partition.owns(training_of_payload(fields.get(PAYLOAD_FIELD)))

    def _own(self, handler: Callable[[bytes, dict[bytes, bytes]], Awaitable[None]]
             ) -> Callable[[bytes, dict[bytes, bytes]], Awaitable[None]]:
        """``handler`` for this partition's entries only (the others are acknowledged unhandled:
        each partition's group reads every entry)."""
        if self.partition.count == 1:
            return handler

        async def own(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
            if self._is_mine(fields):
                await handler(entry_id, fields)
        return own

    def _own_batch(self, handler: Callable[[Entries], Awaitable[None]]) -> Callable[[Entries], Awaitable[None]]:
        """:meth:`_own` for a handler of a read's entries at once."""
        if self.partition.count == 1:
            return handler

        async def own(entries: Entries) -> None:
            mine = [(entry_id, fields) for entry_id, fields in entries if self._is_mine(fields)]
            if mine:
                await handler(mine)
        return own

    def _forgetting_on_failure(self, handler: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
        """``handler``, run only while the lease is valid, dropping the states held in memory when
        it fails part-way (they may be ahead of what was written); the entry is retried against
        the states in Redis. One handler at a time: a partition of another cell reads its cell's
        streams with a consumer of their own, and the machine steps one event at a time."""
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
            async with self._stepping:
                self.lease.check()
                try:
                    await handler(*args, **kwargs)
                except BaseException:
                    self.forget_states()
                    raise
        return guarded

    # -- control ---------------------------------------------------------------

    async def on_control(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            command = decode_control(fields)
        except MalformedMessage as exc:
            await self.ctx.reject("control", "malformed", exc.reason)
            return
        if isinstance(command, StartTraining):
            await self.start_training(command)
        elif isinstance(command, RollbackTraining):
            await self.on_rollback_request(command, entry_id.decode())
        else:
            await self.stop_training(command)

    async def start_training(self, command: StartTraining) -> None:
        if await self.load_state(command.training_id) is not None:
            return  # redelivered or repeated: the training exists already
        config = command.config
        state = TrainingState(
            training_id=command.training_id, config=config,
            org_id=command.org_id, project_id=command.project_id,
            min_clients=config.min_clients or self.settings.min_clients_per_round,
            clients_per_round=min(config.clients_per_round or self.settings.max_clients_per_round,
                                  self.settings.max_clients_per_round),
            round_deadline_s=config.round_deadline_s or self.settings.round_deadline_s,
            privacy_level=config.privacy_level or self.settings.default_privacy_level,
            created_at=command.requested_at,
        )
        state.clip_norm = clip_norm_for(state.privacy_level, config.local.clip_norm)
        if config.secure_aggregation and state.clip_norm is None:
            state.clip_norm = DEFAULT_SECURE_CLIP_NORM
        if config.adaptive_clipping is not None and state.clip_norm is None:
            state.clip_norm = DEFAULT_ADAPTIVE_INITIAL_CLIP_NORM
        refusal = refuse_training(state) or await self.check_validation_data(state)
        if refusal is not None:
            state.status = TrainingStatus.FAILED
            state.reason = refusal
            await self.store.create(state, queued=False)
            await self._emit_status(state, Severity.WARNING)
            return
        state.status = TrainingStatus.QUEUED
        await self.store.create(state, queued=True)
        await self.ctx.emit("training_created", f"training '{config.name}' queued",
                            training_id=state.training_id, status=state.status.value)
        await self.activate_queued()

    async def stop_training(self, command: StopTraining) -> None:
        state = await self.load_state(command.training_id)
        if state is None:
            await self.ctx.reject("control", "unknown_training", command.training_id,
                                  training_id=command.training_id)
            return
        if state.status.is_final:
            return
        await self.finish(state, TrainingStatus.FAILED if command.failed else TrainingStatus.STOPPED,
                          command.reason)

    async def activate_queued(self) -> None:
        """Start this partition's queued trainings, oldest first, while the deployment has free slots."""
        for training_id in await self.store.queued_ids():
            if not self.partition.owns(training_id):
                continue
            state = await self.load_state(training_id)
            if state is not None and state.status is TrainingStatus.QUEUED:
                if not await self.store.claim_slot(training_id, self.settings.max_concurrent_trainings):
                    return
                await self.initialize(state)
            # Only now that INITIALIZING (or FAILED) is durable does the training leave the queue.
            await self.store.remove_queued(training_id)

    async def initialize(self, state: TrainingState) -> None:
        """Build the initial model and hand it to the version manager as version 0 (a training
        whose model comes from its first agent waits for one; ``tick`` asks)."""
        state.status = TrainingStatus.INITIALIZING
        if waits_for_agent(state):
            await self.store.save(state, active=True)
            await self._emit_status(state)
            await self.ask_for_parameters(state)
            return
        try:
            data = await initial_model_bytes(state, self.ctx.blobs)
            layers = check_initial_model(state, data, self.settings.max_blob_bytes)
        except (ValueError, MemoryError) as exc:  # InvalidTensor (too large, bad layers) is a ValueError
            await self.finish(state, TrainingStatus.FAILED, f"cannot build the model: {exc}")
            return
        digest = await self.ctx.blobs.put(data)
        await self.run_step(state, InitialModelStored(digest, spec_of(layers)))

    async def on_upload(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """The update stream carries update notices and the secure-aggregation exchange."""
        if self.batch is not None and (notice := self.batch.notices.get(entry_id)) is not None:
            await self.on_notice(entry_id, notice)
            return
        kind = message_type(fields)
        if kind in SECURE_AGENT_TYPES:
            await self.on_secure_message(fields)
        elif kind == "model_refused":
            await self.on_model_refused(fields)
        else:
            await self.on_update(entry_id, fields)

    async def on_upload_batch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Handle a read of the update stream in order, as ``on_upload`` would one by one, with the
        reads done up front and the writes in one transaction (:mod:`~federated_learning.services.notice_batch`)."""
        self.batch = batch = NoticeBatch()
        try:
            await self._prefetch(batch, entries)
            for entry_id, fields in entries:
                await self.on_upload(entry_id, fields)
            await self.flush_batch()
        finally:
            if batch.pipe is not None:  # a batch that failed part-way: its WATCH's connection back
                await batch.pipe.reset()  # type: ignore[no-untyped-call]
            self.batch = None

    async def _prefetch(self, batch: NoticeBatch, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Read the agents' records and the update notices' duplicate flags in one round trip,
        then the uploads' sizes and headers."""
        notices: list[tuple[str, UpdateSubmitted]] = []
        for raw_id, fields in entries:
            if message_type(fields) == UPDATE_NOTICE:
                try:
                    notice = decode(UpdateSubmitted, fields)
                except MalformedMessage:
                    continue  # refused when its turn comes
                batch.notices[raw_id] = notice
                notices.append((raw_id.decode(), notice))
        agent_ids = sorted({notice.agent_id for _, notice in notices})
        if not agent_ids:
            return
        unknown = [agent_id for agent_id in agent_ids if self.registry.cached(agent_id) is None]
        uploads = sorted({(notice.update_digest, notice.agent_id) for _, notice in notices
                          if notice.update_digest is not None and notice.kind is TaskKind.TRAIN})
        async with self.redis.pipeline(transaction=False) as pipe:
            if unknown:
                self.registry.stage_records(pipe, unknown)
            for entry_id, notice in notices:
                self.stage_duplicate_read(pipe, notice.training_id, notice.round, notice.agent_id, entry_id)
            replies = await pipe.execute()
        if unknown:  # kept by the registry, where ``check_sender`` finds them
            self.registry.keep(self.registry.parse_records(replies.pop(0)))
        for k, (entry_id, notice) in enumerate(notices):
            accepted, marked = replies[2 * k: 2 + 2 * k]
            batch.duplicates[(notice.training_id, notice.round, notice.agent_id, entry_id)] = \
                DuplicateFlags(bool(accepted), bool(marked))
        # A missing blob is read (and refused) when its notice's turn comes.
        batch.heads.update(await self.ctx.blobs.heads(uploads))

    async def on_agent_message(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        await self.on_agent_batch([(entry_id, fields)])

    async def on_agent_batch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Joins, heartbeats and leaves of one read, in order. The heartbeats' sign of life is
        written in one ZADD, before the next join or leave and at the end (an agent's record comes
        from the registry's kept records, so a heartbeat costs no read of its own)."""
        beats: dict[str, float] = {}
        for entry_id, fields in entries:
            try:
                message = decode_agent_message(fields)
            except MalformedMessage as exc:
                await self.ctx.reject("agents", "malformed", exc.reason)
                continue
            if not isinstance(message, Heartbeat):
                await self.registry.touch(beats)
                await self.on_registry_message(entry_id, message)
                continue
            checked = await self._checked_agent_message(entry_id, message)
            if checked is None:
                continue
            received_at, registered = checked
            if registered is None:
                await self.ctx.reject("agents", "unknown_agent", "heartbeat before join", agent_id=message.agent_id)
                continue
            beats[message.agent_id] = max(received_at, beats.get(message.agent_id, 0.0))
        await self.registry.touch(beats)

    async def _checked_agent_message(self, entry_id: bytes, message: AgentJoined | Heartbeat | AgentLeft
                                     ) -> tuple[float, AgentRecord | None] | None:
        """When the bus received the message and the sender's record, or None after refusing it
        (a bad signature, a stale send time)."""
        # A client may XADD with an explicit id far in the future (and every later id follows
        # it): never take the bus's time as later than now.
        received_at = min(entry_time(entry_id), time.time())
        registered = None if isinstance(message, AgentJoined) else await self.registry.get(message.agent_id)
        problem = check_agent_message(message, registered.public_key if registered else None, received_at)
        if problem is not None:
            await self.ctx.reject("agents", problem[0], problem[1], agent_id=message.agent_id)
            return None
        return received_at, registered

    async def on_registry_message(self, entry_id: bytes, message: AgentJoined | AgentLeft) -> None:
        """A join (a first one, or a re-join with what the agent holds now) or a leave."""
        checked = await self._checked_agent_message(entry_id, message)
        if checked is None:
            return
        received_at, registered = checked
        outcome = await self.registry.apply(message, at=received_at,
                                            registered=None if isinstance(message, AgentJoined) else registered is not None)
        if outcome.rejected:
            await self.ctx.reject("agents", outcome.rejected, outcome.detail,
                                  agent_id=message.agent_id)
        elif outcome.event:
            await self.ctx.emit(outcome.event, outcome.detail, agent_id=message.agent_id)

    # -- rounds ----------------------------------------------------------------

    async def tick(self) -> None:
        """Deadlines, paused trainings, dropouts; at most every ``TICK_S``. Runs after every read of
        the streams, where a partition that does not keep the registry drops the agents' records it
        read: partition 0 may have changed them since."""
        if not self.partition.keeps_registry:
            self.registry.forget_records()
        now = time.monotonic()
        if now - self._last_tick < TICK_S:
            return
        self._last_tick = now
        active = await self.store.active_ids()
        if self.partition.keeps_registry:
            ALIVE.set(await self.registry.count_alive())
            ACTIVE.set(len(active))
        for training_id in filter(self.partition.owns, active):
            state = await self.load_state(training_id)
            if state is None:
                continue
            if state.status is TrainingStatus.INITIALIZING and waits_for_agent(state):
                await self.ask_for_parameters(state)
            elif state.phase is RoundPhase.AGGREGATING and time.time() > state.deadline_at:
                await self.aggregation_overdue(state)
            elif state.phase is RoundPhase.IDLE and state.status in (
                    TrainingStatus.RUNNING, TrainingStatus.EVALUATING, TrainingStatus.SAVING):
                await self.resume_interrupted(state)
            elif state.is_buffered and state.status in (TrainingStatus.RUNNING, TrainingStatus.PAUSED):
                await self.refill(state)
            elif state.status is TrainingStatus.PAUSED:
                await self.open_round(state, state.round)
            elif state.phase is RoundPhase.COLLECTING:
                await self._report_dropouts(state, set(await self.registry.alive_among(state.selected)))
                await self.advance(state)
        if now - self._last_slot_check >= SLOT_CHECK_S:
            self._last_slot_check = now  # a slot whose release a failure cut off (``apply_slot_changes``)
            await self.store.release_finished_slots(self.partition.owns)
        await self.activate_queued()
        if self.partition.keeps_registry and now - self._last_sweep >= BLOB_SWEEP_S:
            self._last_sweep = now
            swept = await self.ctx.blobs.sweep_expired()
            if swept:
                log.info("deleted %d expired uploads", swept)

    async def resume_interrupted(self, state: TrainingState) -> None:
        """Finish a step a crash interrupted: a committed round whose next round never opened,
        a training left in SAVING."""
        if state.status is TrainingStatus.SAVING:
            await self.finish(state, TrainingStatus.COMPLETED, "")
        elif state.status in (TrainingStatus.RUNNING, TrainingStatus.EVALUATING) and \
                state.phase is RoundPhase.IDLE and state.completed_rounds == state.round:
            await self.open_round(state, state.round + 1)

class CoordinatorService:
    """One coordinator process: a :class:`Coordinator` per partition of the trainings, each
    working while it holds its partition's lease, and a sign of life that lets several processes
    split the partitions between them (``coordination/partitions.py``)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        count = ctx.settings.coordinator_partitions
        # With one partition there is nothing to split: a standby waits for the lease to be free.
        self.membership = None if count == 1 else Membership(
            ctx.redis, ctx.keys.coordinators, f"coordinator-{ctx.instance}", ttl_s=ctx.settings.coordinator_lease_s)
        self.partitions = [Coordinator(ctx, Partition(index, count), self.membership) for index in range(count)]
        self.mismatch: PartitionCountMismatch | None = None
        """Set when the deployment's recorded partition count is no longer this process's."""

    async def run(self, *, burst: bool = False) -> None:
        await pin_partition_count(self.ctx.redis, self.ctx.keys, len(self.partitions))
        await self._beat()
        helpers = [asyncio.create_task(self._keep_beating())]
        working = [asyncio.create_task(partition.run(burst=burst)) for partition in self.partitions]
        try:
            await asyncio.gather(*working)
            if self.mismatch is not None:
                raise self.mismatch
        except BaseException:
            self.ctx.stop.set()  # one partition failed (or the process is cancelled): stop them all
            raise
        finally:
            await _cancel_and_wait(helpers)  # no sign of life after this
            await _cancel_and_wait(working)
            if self.membership is not None:
                try:  # a clean stop: the others take this process's partitions without waiting
                    await asyncio.wait_for(self.membership.leave(), 1.0)
                except Exception as exc:  # noqa: BLE001 - a lost bus: the sign of life expires anyway
                    log.info("signing out failed: %s", exc)

    async def _beat(self) -> None:
        """Sign in again, and check the deployment's partition count is still this process's (the
        record may have been lost: then it is written again, or inferred from the groups)."""
        if self.membership is None:
            return
        try:
            await self.membership.beat()
            await pin_partition_count(self.ctx.redis, self.ctx.keys, len(self.partitions))
        except (OSError, RedisError) as exc:
            log.warning("coordinator %s could not sign in: %s", self.membership.name, exc)

    async def _keep_beating(self) -> None:
        while self.membership is not None:
            await asyncio.sleep(self.partitions[0].lease.renew_every_s)
            try:
                await self._beat()
            except PartitionCountMismatch as exc:
                self.mismatch = exc
                self.ctx.stop.set()
                return


def main() -> None:
    service_main("coordinator", "federated learning coordinator", lambda ctx: CoordinatorService(ctx).run,
                 fatal=(PartitionCountMismatch,))


if __name__ == "__main__":
    main()
