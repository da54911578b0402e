"""Typed event data: an event of a known kind is checked when built and when decoded."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from federated_learning.protocol.events import Event, RolledBack, TrainingStatusChanged
from federated_learning.protocol.messages import MalformedMessage, TrainingStatus, decode, encode


def test_a_known_kind_is_read_as_its_model() -> None:
    event = Event(kind="training_status", source="coordinator", data={"status": "paused", "reason": "few agents"})
    assert event.payload(TrainingStatusChanged) == TrainingStatusChanged(status=TrainingStatus.PAUSED,
                                                                         reason="few agents")


def test_a_producer_cannot_publish_malformed_data_of_a_known_kind() -> None:
    with pytest.raises(ValidationError):
        Event(kind="rollback", source="coordinator", data={"to_version": "three"})


def test_a_consumer_never_reads_malformed_data_of_a_known_kind() -> None:
    good = encode(Event(kind="rollback", source="coordinator",
                        data=RolledBack(from_version=4, to_version=1, automatic=True, reason="r", at=1.0).model_dump()))
    raw = {key: value.replace(b'"to_version":1', b'"to_version":"x"') if isinstance(value, bytes) else value
           for key, value in good.items()}
    with pytest.raises(MalformedMessage):
        decode(Event, raw)


def test_kinds_without_a_model_carry_free_data() -> None:
    assert Event(kind="secure_roster", source="coordinator", data={"members": 5}).data == {"members": 5}
