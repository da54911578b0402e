"""A local Valkey Cluster from the bundled binaries: primaries with replicas on loopback.

For trying a deployment on a cluster on one machine (``scripts/local-valkey-cluster.py``) and for
the tests that train through one and fail a primary over. Each node is an
:class:`~federated_learning.bus.embedded.EmbeddedValkey` (append-only file, its own folder) with
cluster mode on; ``valkey-cli --cluster create`` assigns the slots and the replicas.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.crc import key_slot

from federated_learning.bus.embedded import (
    EmbeddedServerError,
    EmbeddedValkey,
    free_port,
    valkey_cli_binary,
)
from federated_learning.config import without_secrets

log = logging.getLogger(__name__)

CREATE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SlotOwner:
    """The primary that serves a range of hash slots now, and its replicas' ports."""

    slot: int
    """The range's first slot."""
    last_slot: int
    primary_port: int
    replica_ports: tuple[int, ...]


class LocalCluster:
    """``shards`` primaries with ``replicas`` replicas each, created and health-checked.

    ``node_timeout_ms`` is how long a primary may be unreachable before its replicas take over
    (Valkey's ``cluster-node-timeout``).
    """

    def __init__(self, directory: Path, *, shards: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 2000, password: str | None = None, host: str = "127.0.0.1") -> None:
        if shards < 3:
            raise ValueError("a Valkey Cluster needs at least 3 primaries")
        self.directory = directory
        self.host = host
        self.password = password
        self.replicas = replicas
        options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", str(node_timeout_ms),
                   # A replica of a primary that was down a while may still take over.
                   "--cluster-replica-validity-factor", "0")
        # The cluster bus listens on a port of its own (by default the node's + 10000, which a
        # free port above 55535 would not allow).
        self.nodes = [EmbeddedValkey(directory / f"node-{i}", host=host, password=password,
                                     extra_args=(*options, "--cluster-port", str(free_port(host))))
                      for i in range(shards * (1 + replicas))]

    @property
    def url(self) -> str:
        """Any node's URL (the first one's): a cluster client learns the others from it."""
        return self.nodes[0].url

    def start(self) -> str:
        """Start every node, create the cluster, wait until every slot is served; return :attr:`url`."""
        try:
            for node in self.nodes:
                node.start()
            command = [str(valkey_cli_binary()), "--cluster", "create",
                       *(f"{self.host}:{node.port}" for node in self.nodes),
                       "--cluster-replicas", str(self.replicas), "--cluster-yes"]
            env = without_secrets(os.environ)
            if self.password:
                env["REDISCLI_AUTH"] = self.password  # not on the command line, where `ps` shows it
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  timeout=CREATE_TIMEOUT_S, check=False)
            if done.returncode != 0:
                raise EmbeddedServerError(f"valkey-cli --cluster create failed: {done.stdout[-800:]}{done.stderr[-800:]}")
            self.wait_healthy()
            deadline = time.monotonic() + CREATE_TIMEOUT_S
            while not self.replicated():
                if time.monotonic() > deadline:
                    raise EmbeddedServerError("the replicas did not attach to their primaries")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        log.info("local Valkey Cluster: %d nodes on %s, ports %s", len(self.nodes), self.host,
                 ",".join(str(node.port) for node in self.nodes))
        return self.url

    def _client(self, node: EmbeddedValkey) -> redis.Redis:
        return redis.Redis(host=self.host, port=node.port, password=self.password, socket_connect_timeout=0.5,
                           socket_timeout=2.0)

    def _ask(self, node: EmbeddedValkey, *command: str) -> Any:
        client = self._client(node)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def live_nodes(self) -> list[EmbeddedValkey]:
        return [node for node in self.nodes if node.running]

    def cluster_ok(self) -> bool:
        """Every live node reports ``cluster_state:ok`` (every slot served by a reachable primary)."""
        for node in self.live_nodes():
            try:
                info = self._ask(node, "CLUSTER", "INFO")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def replicated(self) -> bool:
        """Every slot range's primary has its replicas attached."""
        try:
            return all(len(owner.replica_ports) >= self.replicas for owner in self.owners())
        except redis.RedisError:
            return False

    def wait_healthy(self, timeout_s: float = CREATE_TIMEOUT_S) -> None:
        """Until :meth:`cluster_ok`; raises :class:`EmbeddedServerError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.cluster_ok():
                return
            time.sleep(0.05)
        raise EmbeddedServerError(f"the cluster did not serve every slot within {timeout_s:.0f}s")

    def owners(self) -> list[SlotOwner]:
        """Who serves each slot range now, one entry per range, as a live node sees it."""
        ranges = self._ask(self.live_nodes()[0], "CLUSTER", "SLOTS")
        return [SlotOwner(int(first), int(last), int(primary[1]), tuple(int(replica[1]) for replica in replicas))
                for first, last, primary, *replicas in ranges]

    def owner_of(self, key: str) -> SlotOwner:
        """Which primary serves ``key``'s slot now (asked of a live node)."""
        slot = key_slot(key.encode())
        for owner in self.owners():
            if owner.slot <= slot <= owner.last_slot:
                return owner
        raise LookupError(f"no node serves slot {slot}")

    def primary_ports(self) -> set[int]:
        return {owner.primary_port for owner in self.owners()}

    def node_on(self, port: int) -> EmbeddedValkey:
        [node] = [node for node in self.nodes if node.port == port]
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
