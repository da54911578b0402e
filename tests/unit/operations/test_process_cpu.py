import pytest

from federated_learning.monitoring.metrics import MetricType, metrics_from_round
from federated_learning.protocol.events import RoundCompleted
from federated_learning.services.runtime import CpuWindow


def test_cpu_is_percent_of_one_core_and_a_busy_single_thread_reads_100() -> None:
    window = CpuWindow(window_s=10.0)
    assert window.add(0.0, 0.0) == 0.0
    assert window.add(2.0, 2.0) == pytest.approx(100.0)
    assert window.add(4.0, 3.0) == pytest.approx(75.0)


def test_several_busy_cores_read_above_100() -> None:
    window = CpuWindow(window_s=10.0)
    window.add(0.0, 0.0)
    assert window.add(2.0, 8.0) == pytest.approx(400.0)


def test_cpu_is_averaged_over_the_window_only() -> None:
    window = CpuWindow(window_s=4.0)
    for at in range(0, 12, 2):  # busy on one core for 10 s
        window.add(float(at), float(at))
    assert window.add(12.0, 10.0) == pytest.approx(50.0)  # idle since 10 s: [8, 12] holds 2 of 4 s
    assert window.add(14.0, 10.0) == pytest.approx(0.0)
    assert [at for at, _cpu in window.samples] == [10.0, 12.0, 14.0]


def test_round_metrics_record_bytes_received_and_skip_what_was_not_measured() -> None:
    completed = RoundCompleted(version=3, attempts=1, participants=5, selected=6, num_examples=50, train_loss=None,
                               train_accuracy=None, eval_loss=None, eval_accuracy=0.5, eval_of_version=2,
                               upload_bytes=4096, round_seconds=1.5, aggregation_seconds=0.0, epsilon_spent=0.0,
                               completed_at=0.0, update_norm_mean=None)
    metrics = {(m.metric_type, m.value) for m in metrics_from_round(completed, "t", 3)}
    assert {(MetricType.ACCURACY, 0.5), (MetricType.BYTES_RECEIVED, 4096.0), (MetricType.ROUND_TIME, 1.5)} <= metrics
    assert MetricType.UPDATE_NORM not in {kind for kind, _ in metrics}
    assert MetricType.LOSS not in {kind for kind, _ in metrics}


def test_a_span_too_short_to_measure_reads_zero() -> None:
    window = CpuWindow(window_s=30.0)
    window.add(0.0, 0.0)
    assert window.add(0.0004, 0.01) == 0.0  # one CPU-time tick right after start is not 2500 %
    assert window.add(1.0, 0.5) == pytest.approx(50.0)
