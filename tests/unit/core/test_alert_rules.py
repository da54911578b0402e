from federated_learning.monitoring.alerts import (
    Alert,
    RoundObservation,
    open_by_severity,
    reconcile,
    services_down,
    stalled_rounds,
)
from federated_learning.protocol.messages import Severity


def test_missing_service_is_a_critical_condition() -> None:
    conditions = services_down({"coordinator", "privacy", "versions", "dashboard"})
    assert [c.key for c in conditions] == ["service_down:aggregator"]
    assert conditions[0].severity == "critical"


def test_round_past_twice_its_deadline_is_stalled() -> None:
    obs = [RoundObservation("t", 4, "collecting", started_at=100.0, deadline_s=10.0),
           RoundObservation("u", 1, "collecting", started_at=115.0, deadline_s=10.0)]
    assert [c.key for c in stalled_rounds(obs, now=125.0)] == ["stalled_round:t:4"]


def test_reconcile_raises_new_and_resolves_gone_conditions() -> None:
    first, _ = reconcile({}, services_down(set()), now=1.0)
    assert len(first) == 5
    open_alerts = {a.key: a for a in first}
    raised, resolved = reconcile(open_alerts, services_down({"coordinator", "aggregator", "privacy", "versions"}), now=2.0)
    assert raised == []
    assert [a.key for a in resolved] == [k for k in open_alerts if k != "service_down:dashboard"]
    assert all(a.resolved_at == 2.0 for a in resolved)


def test_open_by_severity_counts_every_open_alert_and_every_severity() -> None:
    raised, _ = reconcile({}, services_down({"coordinator", "aggregator", "privacy", "versions"}), now=1.0)
    one_off = Alert(alert_id="x", key="suspicious_update:t:a", rule="suspicious_update", severity=Severity.WARNING,
                    message="-", action="-")
    resolved = one_off.model_copy(update={"key": "suspicious_update:t:b", "resolved_at": 2.0})

    counts = open_by_severity([*raised, one_off, resolved])

    assert counts == {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 1}
