"""Every Redis key, stream and group name, in one place.

All keys start with a configurable prefix so several deployments can share one
server. Keys that belong to one training carry the hash tag ``{t:<id>}``.

On a Redis/Valkey Cluster (``cluster=True``) every key but the blobs also carries the
deployment's tag right after the prefix (``fl:{fl}:stream:updates``): the coordinator's
transactions write a training's keys together with the shared streams, counters and agent
inboxes, so these must share one hash slot. Blobs (models and uploads: nearly all the bytes)
keep untagged names and spread over every shard; no transaction touches them
(``docs/decisions/0013-valkey-cluster.md``).

With several coordinator partitions (``coordinator_partitions``) each partition is a *cell*
(``docs/decisions/0019-a-control-slot-per-partition.md``): the streams its coordinator's
transactions write (accepted updates, jobs, aggregates, releases, versions, events, its outbox of
tasks), the counters they bump and its lease are the cell's own (``fl:p3:stream:jobs``; on a
cluster ``fl:{fl:p3}:stream:jobs``, and a training's keys carry its cell's tag too), so on a
cluster the cells' messages spread over the shards. Cell 0 keeps the deployment's names, and what
belongs to no training (the registry, agents' inboxes, the update notices, the control stream,
alerts) stays in it. :meth:`Keys.in_cell` and :meth:`Keys.for_training` give a cell's names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from federated_learning.types import AgentId, BlobDigest, RoundNumber, TrainingId

GROUP_COORDINATOR = "coordinator"
GROUP_AGGREGATOR = "aggregator"
GROUP_PRIVACY = "privacy"
GROUP_VERSIONS = "versions"
GROUP_MONITOR = "monitor"
GROUP_AGENT = "agent"
GROUP_FORWARDER = "forwarder"
"""Reads a cell's outbox (its partition's coordinator) and forwards the tasks to the inboxes."""


def coordinator_group(partition: int, partitions: int) -> str:
    """The consumer group of one partition's coordinator (``coordination/partitions.py``): one
    group per partition, each reading every entry and handling its own trainings'. A deployment
    of one partition keeps the group name it always had."""
    return GROUP_COORDINATOR if partitions == 1 else f"{GROUP_COORDINATOR}-p{partition}"


def partition_of(training_id: str, partitions: int) -> int:
    """The coordinator partition (and key cell) of ``training_id``: stable across processes,
    machines and Python versions."""
    if partitions == 1:
        return 0
    digest = hashlib.sha256(training_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % partitions


@dataclass(frozen=True)
class Keys:
    """Key names under one deployment prefix."""

    prefix: str = "fl"
    cluster: bool = False
    """Lay the keys out for a Redis/Valkey Cluster (one slot for all but the blobs)."""
    partitions: int = 1
    """How many coordinator partitions (cells) the deployment's trainings are split into."""
    cell: int = 0
    """Whose cell-scoped names these are (see the module's docstring); 0: the deployment's own."""

    def __post_init__(self) -> None:
        if self.partitions < 1 or not 0 <= self.cell < self.partitions:
            raise ValueError(f"cell {self.cell} of {self.partitions} partitions does not exist")

    def in_cell(self, cell: int) -> Keys:
        """The names of cell ``cell`` (its streams, counters, lease)."""
        return self if cell == self.cell else replace(self, cell=cell)

    def for_training(self, training_id: TrainingId) -> Keys:
        """The names of the cell ``training_id`` belongs to."""
        return self.in_cell(partition_of(training_id, self.partitions))

    @property
    def cells(self) -> list[Keys]:
        """Every cell's names, cell 0 first."""
        return [self.in_cell(cell) for cell in range(self.partitions)]

    @property
    def global_keys(self) -> Keys:
        """The deployment's own names (cell 0)."""
        return self.in_cell(0)

    def _k(self, *parts: str) -> str:
        if self.cluster:
            return ":".join((self.prefix, f"{{{self.prefix}}}", *parts))
        return ":".join((self.prefix, *parts))

    def _c(self, *parts: str) -> str:
        """A key of this cell: in cell 0 the deployment's name."""
        if self.cell == 0:
            return self._k(*parts)
        if self.cluster:
            return ":".join((self.prefix, f"{{{self.prefix}:p{self.cell}}}", *parts))
        return ":".join((self.prefix, f"p{self.cell}", *parts))

    def _t(self, kind: str, training_id: TrainingId, *parts: str) -> str:
        """A key of one training: in its cell's hash slot on a cluster (the slot of the
        transactions that write it), under the deployment's name on one server."""
        tag = f"{{t:{training_id}}}"
        if self.cluster and self.partitions > 1:
            return self.for_training(training_id)._c(kind, tag, *parts)
        return self._k(kind, tag, *parts)

    def _blob_k(self, *parts: str) -> str:
        """A blob's key: never tagged, so that a cluster spreads blobs over its shards."""
        return ":".join((self.prefix, *parts))

    # -- streams (bus) --------------------------------------------------------
    @property
    def control_stream(self) -> str:
        """Commands from the dashboard to the coordinator (start, stop)."""
        return self._k("stream", "control")

    @property
    def agent_stream(self) -> str:
        """Joins, heartbeats and leaves from agents."""
        return self._k("stream", "agents")

    @property
    def update_stream(self) -> str:
        """Update notices from agents, read by the coordinator."""
        return self._k("stream", "updates")

    @property
    def accepted_update_stream(self) -> str:
        """Update notices the coordinator accepted after checking only their blob's header: the
        aggregator reads each blob whole as it arrives (hash, values) and keeps it for the job."""
        return self._c("stream", "accepted")

    @property
    def refused_update_stream(self) -> str:
        """Accepted updates the aggregator found invalid, read by the coordinator (services only)."""
        return self._c("stream", "refused")

    @property
    def job_stream(self) -> str:
        """Aggregation jobs, read by the aggregator workers."""
        return self._c("stream", "jobs")

    @property
    def aggregate_stream(self) -> str:
        """Aggregation results, read by the privacy manager."""
        return self._c("stream", "aggregates")

    @property
    def release_stream(self) -> str:
        """Models released by the privacy manager, read by the version manager."""
        return self._c("stream", "releases")

    @property
    def version_stream(self) -> str:
        """Committed versions, read by the coordinator."""
        return self._c("stream", "versions")

    @property
    def event_stream(self) -> str:
        """Everything that happened, read by the monitor and the dashboard."""
        return self._c("stream", "events")

    @property
    def outbox_stream(self) -> str:
        """Tasks and messages a cell's steps sent, forwarded to the agents' inboxes (which are the
        deployment's, in cell 0) by the cell's coordinator after each transaction."""
        return self._c("stream", "outbox")

    def inbox_stream(self, agent_id: AgentId) -> str:
        """One agent's task inbox."""
        return self._k("inbox", agent_id)

    # -- blobs ----------------------------------------------------------------
    def blob(self, digest: BlobDigest, owner: str | None = None) -> str:
        """A blob by its SHA-256: the services' (models, optimiser state) under ``blob:``; an
        agent's upload under ``upload:<agent>:``, the only blobs its Redis user may write."""
        return self._blob_k("blob", digest) if owner is None else self._blob_k("upload", owner, digest)

    @property
    def blob_store(self) -> str:
        """Where the blobs live (``protocol/storage.py``): under ``blob:`` so that every agent,
        which may read the services' blobs and nothing else there, may read it."""
        return self._blob_k("blob", "store")

    # -- registry -------------------------------------------------------------
    @property
    def agents(self) -> str:
        """Hash agent id -> AgentRecord JSON."""
        return self._k("agents")

    @property
    def join_tokens(self) -> str:
        """Hash SHA-256 of a join token -> JoinToken JSON."""
        return self._k("agents", "join_tokens")

    @property
    def agent_volunteers(self) -> str:
        """Set of the volunteer agents' ids (plain-HTTP clients: sent no tasks, awaited each round)."""
        return self._k("agents", "volunteers")

    @property
    def agents_last_seen(self) -> str:
        """Sorted set agent id -> last heartbeat (unix seconds)."""
        return self._k("agents", "last_seen")

    # -- trainings ------------------------------------------------------------
    @property
    def trainings(self) -> str:
        """Sorted set of training ids by creation time."""
        return self._k("trainings")

    @property
    def active_trainings(self) -> str:
        """Set of training ids that hold a concurrency slot."""
        return self._k("trainings", "active")

    @property
    def training_queue(self) -> str:
        """List of training ids waiting for a free slot."""
        return self._k("trainings", "queue")

    def training(self, training_id: TrainingId) -> str:
        """JSON of the training's state (config, status, round, version)."""
        return self._t("training", training_id)

    def dead_letters(self, service: str) -> str:
        """Entries ``service`` gave up on after too many failed deliveries."""
        return self._k("stream", "dead", service)

    @property
    def coordinator_lease(self) -> str:
        """Who runs the coordinator's work now (``bus/lease.py``); standbys wait for it."""
        return self._k("lease", "coordinator")

    def coordinator_lease_of(self, partition: int, partitions: int) -> str:
        """The lease of one partition of the trainings (one partition: :attr:`coordinator_lease`)."""
        if partitions == 1:
            return self.coordinator_lease
        cell = replace(self, partitions=partitions, cell=partition)
        return cell._c("lease", "coordinator", f"p{partition}")  # in the slot of the steps it fences

    def coordinator_wanted(self, partition: int, partitions: int) -> str:
        """Which live coordinator is waiting to take a partition assigned to it (expires unless renewed)."""
        return f"{self.coordinator_lease_of(partition, partitions)}:wanted"

    @property
    def coordinators(self) -> str:
        """Sorted set: live coordinator processes -> when their sign of life expires (server time, ms)."""
        return self._k("coordinators")

    @property
    def coordinator_partitions(self) -> str:
        """How many partitions this deployment's trainings are split into, fixed at its first start."""
        return self._k("coordinators", "partitions")

    def training_view(self, training_id: TrainingId) -> str:
        """JSON of the training's published view (``protocol/trainings.py``), written with its state."""
        return self._t("training_view", training_id)

    def round_updates(self, training_id: TrainingId, round_number: RoundNumber) -> str:
        """Hash agent id -> accepted UpdateSubmitted JSON for one round."""
        return self._t("updates", training_id, str(round_number))

    def applied(self, service: str, entry_id: str) -> str:
        """Marker that ``service`` applied the effects of a stream entry (redelivery skips them)."""
        return self._c("applied", service, entry_id)

    def secure_exchange(self, training_id: TrainingId, round_number: RoundNumber, attempt: int,
                        part: str) -> str:
        """Hash agent id -> message JSON of one secure-aggregation phase ("keys", "shares",
        "unmask") of one round attempt."""
        return self._t("secure", training_id, str(round_number), str(attempt), part)

    def agent_outcomes(self, training_id: TrainingId) -> str:
        """Hash agent id -> its recent task outcomes in the training, oldest first ("1" done, "0" dropped)."""
        return self._t("outcomes", training_id)

    def training_metrics(self, training_id: TrainingId) -> str:
        """List of RoundMetrics JSON, one per completed round."""
        return self._t("metrics", training_id)

    def versions(self, training_id: TrainingId) -> str:
        """Hash version number -> VersionRecord JSON."""
        return self._t("versions", training_id)

    def version_by_round(self, training_id: TrainingId) -> str:
        """Hash round -> version number committed for that round."""
        return self._t("version_round", training_id)

    def aggregator_state(self, training_id: TrainingId) -> str:
        """Hash round -> blob digest of the strategy state after that round."""
        return self._t("aggstate", training_id)

    def release(self, training_id: TrainingId) -> str:
        """Hash round -> ModelReleased JSON (what the privacy manager released)."""
        return self._t("release", training_id)

    def privacy_budget(self, training_id: TrainingId) -> str:
        """JSON of the training's privacy accountant."""
        return self._t("privacy", training_id)

    def model_refusals(self, training_id: TrainingId) -> str:
        """Hash agent id -> ModelRefusal JSON: agents (and HTTP clients) whose model is not the
        training's, with the reason (shown in the training's status)."""
        return self._k("refusals", f"{{t:{training_id}}}")  # written alone, by the coordinator and the dashboard

    @property
    def model_refusals_pattern(self) -> str:
        return self._k("refusals", "*")

    # -- user models -----------------------------------------------------------
    def models(self, org_id: str) -> str:
        """Hash model id -> ModelRecord JSON: the models an organisation uploaded."""
        return self._k("models", org_id)

    @property
    def models_pattern(self) -> str:
        return self._k("models", "*")

    @staticmethod
    def model_owner(org_id: str) -> str:
        """The blob owner of an organisation's uploaded models: they live beside the agents'
        uploads (``upload:_models.<org>:<sha256>``), which the dashboard may write, and the
        coordinator copies one into the services' blobs when a training starts from it. No agent
        id can start with '_', so no agent (nor its ACL user) owns this namespace."""
        return f"_models.{org_id}"

    # -- monitoring -----------------------------------------------------------
    def service_health(self, service: str, instance: str) -> str:
        """Key with a TTL that a live service instance refreshes."""
        return self._k("health", service, instance)

    @property
    def service_health_pattern(self) -> str:
        return self._k("health", "*")

    @property
    def alerts(self) -> str:
        """Hash alert id -> Alert JSON."""
        return self._k("alerts")

    @property
    def open_alerts(self) -> str:
        """Hash condition key -> alert id of the open alert for it."""
        return self._k("alerts", "open")

    def metric_series(self, training_id: TrainingId) -> str:
        """List of TrainingMetric JSON recorded by the monitor."""
        return self._k("monitor", f"{{t:{training_id}}}")  # the monitor's transactions write it with alerts

    @property
    def agent_dropouts(self) -> str:
        """Hash agent id -> rounds it dropped out of."""
        return self._k("monitor", "dropouts")

    @property
    def agent_stats(self) -> str:
        """Hash '<agent>:<counter>' -> count (asked, completed, late, examples): each cell counts
        what its steps did; :attr:`cells` reads them all."""
        return self._c("agents", "stats")

    def first_joins(self, credential: str, minute: int) -> str:
        """Counter of new agent ids ``credential`` registered in ``minute`` (unix minutes)."""
        return self._k("agents", "first_joins", credential, str(minute))

    def agent_asked_at(self, agent_id: AgentId) -> str:
        """Sorted set of task ids -> the time the agent was given them (for the hourly cap)."""
        return self._k("agents", "asked_at", agent_id)

    @property
    def agent_flags(self) -> str:
        """Hash agent id -> rounds in which its update was flagged as anomalous."""
        return self._k("monitor", "flags")

    @property
    def agent_contributions(self) -> str:
        """Hash agent id -> sum over committed rounds of examples x max(0, cosine of its update
        to the round's median update) (examples alone in rounds whose updates are not scored):
        how much its updates pulled the model the way it went. Per cell, like :attr:`agent_stats`."""
        return self._c("agents", "contributions")

    @property
    def rejections(self) -> str:
        """Hash reason -> count of rejected inputs."""
        return self._k("rejections")

    # -- organisations ----------------------------------------------------------
    @property
    def organisations(self) -> str:
        """Hash organisation id -> Organisation JSON."""
        return self._k("orgs")

    @property
    def organisation_pattern(self) -> str:
        """Every project hash and the API-key hash (written by the dashboard)."""
        return self._k("orgs", "*")

    def projects(self, org_id: str) -> str:
        """Hash project id -> Project JSON of one organisation."""
        return self._k("orgs", org_id, "projects")

    @property
    def api_keys(self) -> str:
        """Hash key id -> ApiKeyRecord JSON (the SHA-256 of the key, never the key)."""
        return self._k("orgs", "api_keys")

    def org_trainings(self, org_id: str) -> str:
        """Sorted set of one organisation's training ids by creation time."""
        return self._k("trainings", "org", org_id)

    # -- access-control patterns (Redis ACL key globs) -------------------------
    @property
    def all_keys_pattern(self) -> str:
        """Every key of this deployment, blobs included (the services' ACL user)."""
        return self._blob_k("*")

    @property
    def blob_pattern(self) -> str:
        """Every services' blob: content-addressed, so any reader verifies what it gets."""
        return self._blob_k("blob", "*")

    def upload_pattern(self, owner: str = "*") -> str:
        """The uploads of one agent (every agent's with the default)."""
        return self._blob_k("upload", owner, "*")

    def service_health_keys(self, service: str) -> str:
        """The health keys of every instance of ``service``."""
        return self._k("health", service, "*")

    def agent_write_keys(self) -> tuple[str, ...]:
        """Streams an agent appends to (joins, heartbeats, leaves; update notices)."""
        return self.agent_stream, self.update_stream

    def dashboard_write_keys(self) -> tuple[str, ...]:
        """Keys (and globs) the dashboard writes: commands, events, rejections, alert
        acknowledgements, join tokens, its health key, the HTTP sync gateway's agent
        messages and uploads, organisations, projects and API keys, uploaded models and the
        HTTP clients' model refusals. Everything else it
        only reads."""
        return (self.control_stream, *(cell.event_stream for cell in self.cells), self.rejections, self.alerts,
                self.open_alerts, self.join_tokens, self.service_health_keys("dashboard"),
                *self.agent_write_keys(), self.upload_pattern(), self.organisations, self.organisation_pattern,
                self.models_pattern, self.model_refusals_pattern)
