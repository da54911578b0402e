"""Typed views of redis-py replies, whose stubs allow bytes or str and several reply shapes."""

from __future__ import annotations

from typing import TypeAlias, cast

StreamBatch: TypeAlias = tuple[bytes | str, list[tuple[bytes, dict[bytes, bytes]]]]
"""One stream's part of an XREAD reply: its name and its (entry id, fields) pairs."""

GroupBatch: TypeAlias = tuple[bytes | str, list[tuple[bytes, dict[bytes, bytes] | None]]]
"""One stream's part of an XREADGROUP reply; fields are None for entries deleted while pending."""


def text(value: bytes | str) -> str:
    """``value`` as a string: bytes are decoded as UTF-8, a string is returned as is."""
    return value.decode() if isinstance(value, bytes) else value


def read_batches(reply: object) -> list[StreamBatch]:
    """An XREAD reply (RESP2, undecoded) as per-stream batches; none when it timed out."""
    return cast("list[StreamBatch]", reply or [])


def group_batches(reply: object) -> list[GroupBatch]:
    """An XREADGROUP reply (RESP2, undecoded) as per-stream batches; none when it timed out."""
    return cast("list[GroupBatch]", reply or [])
