"""What the services expose to Prometheus: open alerts as the page lists them, one exposition
format, no ``_created`` series, and no series left behind by finished trainings."""

import subprocess
import sys
import urllib.request

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge

from federated_learning.monitoring.alerts import Alert
from federated_learning.protocol.messages import Severity
from federated_learning.services.monitor import publish_open_alerts
from federated_learning.services.runtime import (
    forget_training,
    labelled_trainings,
    start_metrics_server,
)


def alert(key: str, rule: str, severity: Severity, *, resolved: bool = False) -> Alert:
    return Alert(alert_id=key, key=key, rule=rule, severity=severity, message=key, action="-",
                 resolved_at=2.0 if resolved else None)


def test_alerts_open_counts_one_off_alerts_too() -> None:
    publish_open_alerts([
        alert("suspicious_update:t:a", "suspicious_update", Severity.WARNING),
        alert("rollback:t:3:100", "rollback", Severity.WARNING),
        alert("stalled_round:t:4", "stalled_round", Severity.WARNING),
        alert("service_down:versions", "service_down", Severity.CRITICAL),
        alert("suspicious_update:t:b", "suspicious_update", Severity.WARNING, resolved=True),
    ])

    counts = {s.value: REGISTRY.get_sample_value("fl_alerts_open", {"severity": s.value}) for s in Severity}
    assert counts == {"info": 0.0, "warning": 3.0, "critical": 1.0}


def test_alerts_open_falls_to_zero_when_nothing_is_open() -> None:
    publish_open_alerts([alert("rollback:t:3:100", "rollback", Severity.WARNING)])
    publish_open_alerts([])
    assert REGISTRY.get_sample_value("fl_alerts_open", {"severity": "warning"}) == 0.0


def test_a_finished_training_leaves_the_gauge_and_the_others_stay() -> None:
    gauge = Gauge("accuracy", "-", ["training"], registry=CollectorRegistry())
    gauge.labels("t1").set(0.5)
    gauge.labels("t2").set(0.6)

    forget_training("t1", [gauge])
    forget_training("never-seen", [gauge])

    assert labelled_trainings([gauge]) == {"t2"}


def test_service_metrics_port_serves_the_dashboards_format_whatever_is_asked() -> None:
    port = start_metrics_server(0)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read().decode()
        content_type = response.headers["Content-Type"]
    assert content_type == CONTENT_TYPE_LATEST
    assert "# EOF" not in body and "fl_rejected_inputs_total" in body


def test_a_started_service_exposes_no_created_series() -> None:
    program = ("from prometheus_client import Counter\n"
               "from federated_learning.services.runtime import exposition, setup_logging\n"
               "Counter('probe', 'probe').inc()\n"
               "setup_logging('WARNING', 'probe')\n"
               "print(exposition()[0].decode())\n")
    shown = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert "probe_total 1.0" in shown
    assert "_created" not in shown
