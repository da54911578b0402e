from federated_learning.monitoring.alerts import Condition
from federated_learning.monitoring.rules import (
    ProcessUsage,
    accuracy_drop,
    agent_failure_rate,
    health_verdict,
    pending_backlog,
    privacy_budget,
    process_resources,
    process_usages,
    redis_memory,
    release_refused,
    version_accuracies,
)
from federated_learning.protocol.messages import RoundMetrics, Severity

MIB = 2**20


def test_accuracy_drop_fires_at_the_threshold_and_not_above_it() -> None:
    fired = accuracy_drop("t", {0: 0.25, 1: 0.5, 2: 0.375}, threshold=0.25)
    assert [c.key for c in fired] == ["accuracy_drop:t"]
    assert "version 2" in fired[0].message and "version 1" in fired[0].message
    assert accuracy_drop("t", {0: 0.25, 1: 0.5, 2: 0.376}, threshold=0.25) == []


def test_accuracy_drop_is_silent_when_the_latest_is_best() -> None:
    assert accuracy_drop("t", {0: 0.5, 1: 0.9}) == []
    assert accuracy_drop("t", {}) == []


def test_agent_failure_rate_fires_at_the_threshold_and_not_below() -> None:
    outcomes = {"a": [True] * 5 + [False] * 5, "b": [True] * 6 + [False] * 4, "c": [False] * 2}
    fired = agent_failure_rate("t", outcomes, window=10, threshold=0.5)
    assert [c.key for c in fired] == ["agent_failure_rate:t:a"]
    assert "agent a failed 5 of its last 10 tasks" in fired[0].message


def test_agent_failure_rate_looks_only_at_the_window() -> None:
    outcomes = {"a": [False] * 10 + [True] * 4}
    assert agent_failure_rate("t", outcomes, window=4, threshold=0.5) == []
    assert len(agent_failure_rate("t", outcomes, window=8, threshold=0.5)) == 1


def test_privacy_budget_warns_at_eighty_percent_and_not_below() -> None:
    assert privacy_budget("t", 0.79, 1.0) == []
    [warning] = privacy_budget("t", 0.8, 1.0)
    assert (warning.key, warning.severity) == ("privacy_budget_warning:t", "warning")


def test_privacy_budget_is_critical_at_one_hundred_percent() -> None:
    [critical] = privacy_budget("t", 2.0, 2.0)
    assert (critical.key, critical.severity) == ("privacy_budget_exhausted:t", "critical")
    assert "100%" in critical.message


def test_privacy_budget_is_exhausted_within_the_tolerance_of_the_target() -> None:
    [critical] = privacy_budget("t", 2.99998, 3.0)
    assert critical.key == "privacy_budget_exhausted:t" and "100%" in critical.message
    assert privacy_budget("t", 2.997, 3.0)[0].key == "privacy_budget_exhausted:t"
    assert privacy_budget("t", 2.996, 3.0)[0].key == "privacy_budget_warning:t"
    assert privacy_budget("t", 2.99998, 3.0, tolerance=0.0)[0].key == "privacy_budget_warning:t"


def test_a_refused_release_is_the_exhausted_alert() -> None:
    [critical] = release_refused("t", "privacy budget exhausted: epsilon spent 2.99998 of 3.0")
    assert (critical.key, critical.severity) == ("privacy_budget_exhausted:t", "critical")
    assert "release refused" in critical.message and "2.99998 of 3.0" in critical.message
    assert critical.action == privacy_budget("t", 3.0, 3.0)[0].action


def test_redis_memory_fires_at_the_fraction_and_not_below() -> None:
    assert [c.key for c in redis_memory(90 * MIB, 100 * MIB, fraction=0.9)] == ["redis_memory"]
    assert redis_memory(90 * MIB - 1, 100 * MIB, fraction=0.9) == []


def test_redis_without_maxmemory_never_alerts() -> None:
    assert redis_memory(10**12, 0) == []


def test_pending_backlog_fires_at_the_limit_and_not_below() -> None:
    fired = pending_backlog({"fl:updates/aggregator": 100, "fl:jobs/privacy": 99}, limit=100)
    assert [c.key for c in fired] == ["pending_backlog:fl:updates/aggregator"]


def test_process_exhaustion_fires_at_the_limits_and_not_below() -> None:
    usages = [ProcessUsage("aggregator", 95.0, 89.9), ProcessUsage("coordinator", 94.9, 90.0)]
    fired = process_resources(usages, cpu_limit=95.0, memory_limit=90.0)
    assert [(c.key, c.severity) for c in fired] == [
        ("cpu_exhaustion:aggregator", "warning"), ("memory_exhaustion:coordinator", "critical")]
    assert all(c.message and c.action for c in fired)


def test_cpu_is_judged_per_core_so_one_saturated_core_alerts() -> None:
    usages = [ProcessUsage("coordinator", 100.0, 1.0), ProcessUsage("aggregator", 400.0, 1.0),
              ProcessUsage("monitor", 50.0, 1.0)]
    fired = process_resources(usages)
    assert [c.key for c in fired] == ["cpu_exhaustion:aggregator", "cpu_exhaustion:coordinator"]
    assert "coordinator uses 100% of a CPU core (limit 95%)" in fired[1].message


def _evaluation(eval_of_version: int | None, accuracy: float | None) -> RoundMetrics:
    return RoundMetrics(training_id="t", round=1, version=1, attempts=1, participants=2, selected=2,
                        num_examples=10, train_loss=None, train_accuracy=None, eval_loss=None,
                        eval_accuracy=accuracy, eval_of_version=eval_of_version, round_seconds=1.0,
                        aggregation_seconds=0.1, epsilon_spent=0.0, completed_at=0.0)


def test_version_accuracies_keep_the_latest_evaluation_of_each_version() -> None:
    rows = [_evaluation(0, 0.25), _evaluation(1, 0.5), _evaluation(None, 0.9), _evaluation(2, None),
            _evaluation(1, 0.75)]
    assert version_accuracies(rows) == {0: 0.25, 1: 0.75}


def test_process_usages_name_instances_and_skip_records_without_usage() -> None:
    records = [{"service": "aggregator", "instance": "1", "cpu_percent": 12.5, "memory_percent": 3},
               {"service": "coordinator", "instance": "0"}]
    assert process_usages(records) == [ProcessUsage("aggregator/1", 12.5, 3.0)]


def test_health_verdict_follows_the_worst_severity() -> None:
    warning = Condition(key="w", rule="r", severity=Severity.WARNING, message="slow", action="")
    critical = Condition(key="c", rule="r", severity=Severity.CRITICAL, message="down", action="")
    assert health_verdict([]) == ("healthy", [])
    assert health_verdict([warning]) == ("degraded", ["slow"])
    assert health_verdict([warning, critical]) == ("critical", ["slow", "down"])
