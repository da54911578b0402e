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
