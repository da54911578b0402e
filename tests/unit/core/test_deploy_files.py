import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_grafana_panels_query_metrics_the_services_export() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    queried = {name.removesuffix("_bucket") for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bfl_[a-z_]+", target["expr"])}
    source = "\n".join(p.read_text() for p in (ROOT / "federated_learning").rglob("*.py"))
    exported = {n.removesuffix("_total") for n in re.findall(r'"(fl_[a-z_]+)"', source)}
    assert queried and {q.removesuffix("_total") for q in queried} <= exported


def test_shipped_prometheus_config_scrapes_the_default_ports() -> None:
    from federated_learning.config import load_settings
    from federated_learning.deploy.launcher import scrape_targets

    settings = load_settings(ROOT / "config.json").model_copy(update={"aggregator_workers": 4})
    shipped = set(re.findall(r'"(127\.0\.0\.1:\d+)"', (ROOT / "deploy" / "prometheus.yml").read_text()))
    expected = {target for targets in scrape_targets(settings).values() for target in targets}
    assert expected == shipped


def test_launcher_writes_a_config_for_its_own_ports() -> None:
    from federated_learning.config import Settings
    from federated_learning.deploy.launcher import prometheus_config

    text = prometheus_config(Settings(metrics_port_base=9200, aggregator_workers=2, dashboard_port=8099))
    assert '"127.0.0.1:9201"' in text and '"127.0.0.1:9210", "127.0.0.1:9211"' in text and ":8099" in text
