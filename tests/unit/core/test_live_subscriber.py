"""Which events a WebSocket subscriber receives, by topic and organisation (pure)."""

from __future__ import annotations

from federated_learning.dashboard.live import ALL, Subscriber


def test_an_organisations_subscriber_gets_only_its_trainings_events() -> None:
    subscriber = Subscriber("s", topics={ALL}, org_id="acme")
    assert subscriber.wants("acme.a")
    assert not subscriber.wants("globex.a") and not subscriber.wants("plain") and not subscriber.wants(None)


def test_it_may_follow_its_own_trainings_and_the_wildcard_only() -> None:
    subscriber = Subscriber("s", org_id="acme")
    assert subscriber.may_follow("acme.a") and subscriber.may_follow(ALL)
    assert not subscriber.may_follow("globex.a") and not subscriber.may_follow("plain")


def test_the_bootstrap_subscriber_follows_everything() -> None:
    subscriber = Subscriber("s", topics={ALL})
    assert subscriber.wants("globex.a") and subscriber.wants("plain") and subscriber.wants(None)
    assert subscriber.may_follow("globex.a")
