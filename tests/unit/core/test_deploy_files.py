import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
METRIC_CONSTRUCTOR = re.compile(r'\b(Counter|Gauge|Histogram|Summary)\(\s*"(fl_[a-z_]+)"')
SERIES_SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_count", "_sum"),
                   "Summary": ("", "_count", "_sum")}
REGENERATE = ("regenerate it with: .venv/bin/python -c 'from federated_learning.config import load_settings; "
              "from federated_learning.deploy.launcher import prometheus_config; "
              "print(prometheus_config(load_settings()), end=\"\")' > deploy/prometheus.yml")


def exported_series() -> set[str]:
    """Every series name the services' prometheus_client metrics expose (a Counter's ``_total``,
    a Histogram's ``_bucket``/``_count``/``_sum``)."""
    source = "\n".join(p.read_text() for p in (ROOT / "federated_learning").rglob("*.py"))
    series = set()
    for kind, name in METRIC_CONSTRUCTOR.findall(source):
        base = name.removesuffix("_total") if kind == "Counter" else name
        series |= {base + suffix for suffix in SERIES_SUFFIXES[kind]}
    return series


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())["panels"]
    return panels


def test_every_grafana_panel_queries_series_the_services_export() -> None:
    exported = exported_series()
    for panel in dashboard_panels():
        queried = {name for target in panel["targets"] for name in re.findall(r"\bfl_[a-z_]+", target["expr"])}
        assert queried, panel["title"]
        assert queried <= exported, f"{panel['title']}: {sorted(queried - exported)} not exported"


def test_grafana_charts_updates_bytes_rollbacks_and_pending_messages() -> None:
    exprs = " ".join(target["expr"] for panel in dashboard_panels() for target in panel["targets"])
    assert "rate(fl_updates_accepted_total[" in exprs
    assert "rate(fl_update_bytes_received_total[" in exprs
    assert "increase(fl_rollbacks_total[" in exprs
    assert "fl_bus_pending_messages" in exprs


def test_grafana_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_shipped_prometheus_config_is_the_launchers_output_for_the_shipped_config(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from federated_learning.config import load_settings
    from federated_learning.deploy.launcher import prometheus_config

    for name in [name for name in os.environ if name.startswith("FL_")]:
        monkeypatch.delenv(name)
    settings = load_settings(ROOT / "config.json")
    shipped = (ROOT / "deploy" / "prometheus.yml").read_text()

    assert shipped == prometheus_config(settings), REGENERATE


def test_a_multi_worker_config_scrapes_one_target_per_aggregator_worker() -> None:
    from federated_learning.config import Settings
    from federated_learning.deploy.launcher import prometheus_config, scrape_targets

    settings = Settings(metrics_port_base=9200, aggregator_workers=4, dashboard_port=8099)
    text = prometheus_config(settings)

    assert scrape_targets(settings)["aggregator"] == [f"127.0.0.1:{port}" for port in (9210, 9211, 9212, 9213)]
    assert '"127.0.0.1:9210", "127.0.0.1:9211", "127.0.0.1:9212", "127.0.0.1:9213"' in text
    assert '"127.0.0.1:9201"' in text and ":8099" in text


def test_several_coordinator_processes_get_their_own_instance_and_metrics_port(tmp_path: Path) -> None:
    from federated_learning.config import Settings
    from federated_learning.deploy.access import RoleUrls, write_role_secrets
    from federated_learning.deploy.launcher import build_children, scrape_targets

    settings = Settings(metrics_port_base=9200, coordinator_processes=3, coordinator_partitions=4,
                        aggregator_workers=2, dashboard_port=8099, data_dir=tmp_path)

    assert scrape_targets(settings)["coordinator"] == ["127.0.0.1:9201", "127.0.0.1:9281", "127.0.0.1:9282"]
    assert scrape_targets(settings)["aggregator"] == ["127.0.0.1:9210", "127.0.0.1:9211"]
    roles = write_role_secrets(tmp_path / "run" / "secrets", RoleUrls("redis://a", "redis://b"), "k" * 24)
    children = build_children(settings, None, roles, tmp_path)
    coordinators = [child for child in children if child.name.startswith("coordinator")]
    assert [child.name for child in coordinators] == ["coordinator-0", "coordinator-1", "coordinator-2"]
    assert [child.command[-1] for child in coordinators] == ["0", "1", "2"]
