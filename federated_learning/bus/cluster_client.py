"""The services' cluster client: redis-py's, with transactions that start no thread per command.

redis-py 8.2 resolves the slot of every command of a cluster transaction (queued, or run at once
between WATCH and MULTI) on a new thread with an event loop of its own, since queuing is
synchronous and its slot lookup is not: 0.4 ms per command, 413 ms to queue a transaction of
1,000 commands against 21 ms to run it (measured on the local cluster). A coordinator batch of
128 update notices queues about a thousand, and every step transaction WATCHes the lease's epoch
and reads it. Here a command whose keys we know (the key first, or the keys of EVAL and WATCH)
gets its slot from the keys' CRC16 on the spot; an immediate one is then sent on the caller's
loop as redis-py would after its lookup. Any other command keeps redis-py's path. The slots are
checked as before: a transaction whose keys span slots is refused.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import (
    ClusterPipeline,
    PipelineCommand,
    RedisCluster,
    TransactionStrategy,
)
from redis.exceptions import CrossSlotTransactionError, RedisClusterException

KEY_FIRST_COMMANDS = frozenset({
    "SET", "SETNX", "SETEX", "PSETEX", "GETDEL", "INCR", "INCRBY", "INCRBYFLOAT", "DECR", "DECRBY",
    "DEL", "UNLINK", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST",
    "HSET", "HSETNX", "HMSET", "HDEL", "HINCRBY", "HINCRBYFLOAT",
    "LPUSH", "RPUSH", "LTRIM", "LREM", "LSET",
    "SADD", "SREM", "ZADD", "ZREM", "ZINCRBY", "ZREMRANGEBYSCORE", "ZREMRANGEBYRANK",
    "XADD", "XACK", "XDEL", "XTRIM",
})
"""Write commands whose first argument is their (first) key."""


KEY_FIRST_READS = frozenset({
    "GET", "GETRANGE", "STRLEN", "EXISTS", "TYPE", "TTL", "PTTL",
    "HGET", "HMGET", "HGETALL", "HKEYS", "HVALS", "HLEN", "HEXISTS",
    "LRANGE", "LLEN", "LINDEX", "SMEMBERS", "SISMEMBER", "SCARD",
    "ZSCORE", "ZRANGE", "ZRANGEBYSCORE", "ZCARD", "XLEN", "XRANGE", "XREVRANGE",
})
"""Reads whose first argument is their key (run at once between WATCH and MULTI)."""


ALL_ARGUMENTS_KEYS = frozenset({"DEL", "UNLINK", "EXISTS", "WATCH"})
"""Commands whose every argument is a key."""


class KeyFirstTransactionStrategy(TransactionStrategy):
    """Gives a transaction's command whose keys are known its slot on the caller's thread, with
    redis-py's rules (``TransactionStrategy._execute_command``): a command runs at once between
    WATCH and MULTI, else is queued; slots that came only from keyless scripts give way to the
    first keyed command's."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        name = str(args[0]).upper()
        slots = self._known_slots(name, args)
        if slots is None:
            return super().execute_command(*args, **kwargs)
        if len(slots) > 1:
            raise RedisClusterException(f"{name} - all keys must map to the same key slot")
        [slot] = slots
        immediate = (self._watching or name in self.IMMEDIATE_EXECUTE_COMMANDS) and not self._explicit_transaction
        if not immediate and name not in KEY_FIRST_COMMANDS and name not in ("EVAL", "EVALSHA"):
            return super().execute_command(*args, **kwargs)  # a read queued after MULTI: redis-py's way
        if self._pipeline_slots and slot not in self._pipeline_slots and not self._transaction_has_keyed_slot:
            self._pipeline_slots.clear()  # the slots so far came from keyless scripts only
        self._transaction_has_keyed_slot = True
        if not immediate:
            self._pipeline_slots.add(slot)
            self._command_queue.append(PipelineCommand(len(self._command_queue), *args, **kwargs))
            return self._pipe
        if name == "WATCH":
            self._validate_watch()  # type: ignore[no-untyped-call]
        if self._pipeline_slots and slot not in self._pipeline_slots:
            raise CrossSlotTransactionError("Cannot watch or send commands on different slots")
        self._pipeline_slots.add(slot)
        return self._immediate_execute_command(*args, **kwargs)  # type: ignore[no-untyped-call]  # awaited by the caller

    def _known_slots(self, name: str, args: tuple[Any, ...]) -> set[int] | None:
        """The slots of the command's keys, when this client knows where its keys are."""
        keyslot = self._pipe.cluster_client.keyslot
        if len(args) < 2:
            return None
        if name in ALL_ARGUMENTS_KEYS:
            return {keyslot(key) for key in args[1:]}
        if name in KEY_FIRST_COMMANDS or name in KEY_FIRST_READS:
            return {keyslot(args[1])}
        if name in ("EVAL", "EVALSHA") and len(args) > 3 and int(args[2]) >= 1:
            return {keyslot(key) for key in args[3:3 + int(args[2])]}
        return None


class ServicesCluster(RedisCluster):
    """:class:`RedisCluster` whose transactional pipelines use :class:`KeyFirstTransactionStrategy`."""

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        if transaction:
            pipe._execution_strategy = KeyFirstTransactionStrategy(pipe)
        return pipe
