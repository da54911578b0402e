"""The pure checks behind the forged stream id defence (federated_learning/bus/stream_ids.py)."""

from __future__ import annotations

import pytest
from redis.exceptions import ResponseError

from federated_learning.bus.stream_ids import (
    FORGED_ID_TOLERANCE_MS,
    SUSPECT_AFTER_MS,
    StreamRepair,
    id_millis,
    is_beyond,
    is_stream_id_refusal,
)

NOW_MS = 1_700_000_000_000
MAX_ID = "18446744073709551615-18446744073709551615"


def test_the_millisecond_part_is_read_from_bytes_and_text() -> None:
    assert id_millis(b"1700000000000-3") == 1_700_000_000_000
    assert id_millis("0-0") == 0
    assert id_millis(MAX_ID) == 2**64 - 1


@pytest.mark.parametrize("bad", ["", "123", "-1-0", "12-", "a-1", "1-2-3", "18446744073709551616-0", "1-18446744073709551616"])
def test_what_is_not_a_stream_id_is_refused_with_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="not a stream entry id"):
        id_millis(bad)


def test_an_id_up_to_the_tolerance_ahead_is_the_servers() -> None:
    assert not is_beyond(f"{NOW_MS}-0", NOW_MS)
    assert not is_beyond(f"{NOW_MS - 86_400_000}-7", NOW_MS)
    assert not is_beyond(f"{NOW_MS + FORGED_ID_TOLERANCE_MS}-99", NOW_MS)


def test_an_id_beyond_the_tolerance_was_chosen_by_its_writer() -> None:
    assert is_beyond(f"{NOW_MS + FORGED_ID_TOLERANCE_MS + 1}-0", NOW_MS)
    assert is_beyond(MAX_ID, NOW_MS)


def test_consumers_suspect_an_id_at_half_the_tolerance() -> None:
    half_way = f"{NOW_MS + FORGED_ID_TOLERANCE_MS // 2 + 1}-0"
    assert is_beyond(half_way, NOW_MS, SUSPECT_AFTER_MS)
    assert not is_beyond(half_way, NOW_MS)


def test_a_negative_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="tolerance_ms must be >= 0; got -1"):
        is_beyond("1-0", NOW_MS, -1)


def test_only_the_servers_no_room_for_an_id_answers_count_as_refusals() -> None:
    assert is_stream_id_refusal(ResponseError("The stream has exhausted the last possible ID, unable to add more items"))
    assert is_stream_id_refusal(ResponseError(
        "The ID specified in XADD is equal or smaller than the target stream top item"))
    assert not is_stream_id_refusal(ResponseError("NOGROUP No such key 'fl:stream:agents'"))
    assert not is_stream_id_refusal(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))


def test_a_repair_describes_the_forged_id_the_moves_and_the_reset() -> None:
    repair = StreamRepair(stream="fl:stream:agents", forged_id=MAX_ID, moved={"9-1": "5-1", "9-2": "5-2"},
                          last_id=MAX_ID, reset_to="5-0")
    assert repair.describe() == (
        f"stream id {MAX_ID} lies beyond the server's clock + 3600000 ms (entry {MAX_ID} deleted; "
        "2 later entries moved to server ids; last id reset to 5-0)")
    gone = StreamRepair(stream="s", forged_id="", moved={}, last_id=MAX_ID, reset_to="5-0")
    assert "no entry left at it" in gone.describe()
