"""ACL rules, role URLs and the TLS settings, without a server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from federated_learning.bus.connection import RedisTls, redacted, with_credentials
from federated_learning.config import SECRETS_DIR_ENV, ConfigError, Settings, load_settings
from federated_learning.deploy import acl
from federated_learning.deploy.access import RoleUrls, write_role_secrets
from federated_learning.deploy.launcher import build_children, prometheus_config
from federated_learning.deploy.supervisor import Child
from federated_learning.protocol.keys import Keys

KEYS = Keys("org1")


def test_agent_user_may_touch_only_its_own_inbox_and_uploads_the_shared_streams_and_read_blobs() -> None:
    user = acl.agent_user(KEYS, "bot-7")
    assert user.name == "org1-agent-bot-7"
    patterns = [rule for rule in " ".join(user.rules).replace("(", " ").split() if "~" in rule]
    assert patterns == ["%W~org1:stream:agents", "%W~org1:stream:updates", "~org1:inbox:bot-7",
                        "%R~org1:blob:*", "~org1:upload:bot-7:*"]
    assert "-@all" in user.rules


def test_services_and_dashboard_users_stay_under_the_prefix() -> None:
    services, dashboard = acl.role_users(KEYS)
    assert services.name == "org1-services" and "~org1:*" in services.rules
    assert "%R~org1:*" in dashboard.rules and "~org1:stream:control" in dashboard.rules
    assert not any(rule.startswith("~") and not rule.startswith("~org1:")
                   for rule in services.rules + dashboard.rules)


@pytest.mark.parametrize("agent_id", ["", "a*", "a b", "-x", "a" * 129])
def test_agent_ids_that_could_widen_a_key_pattern_are_refused(agent_id: str) -> None:
    with pytest.raises(acl.AclError, match="is not a valid identifier"):
        acl.agent_user_name(KEYS, agent_id)


def test_passwords_are_kept_across_provisioning_runs(tmp_path: Path) -> None:
    first = acl.password_for(tmp_path, "org1-services", create=True)
    assert acl.password_for(tmp_path, "org1-services", create=True) == first
    with pytest.raises(acl.AclError, match="no password for Redis user 'org1-dashboard'"):
        acl.password_for(tmp_path, "org1-dashboard", create=False)


def test_credentials_replace_those_in_the_url_and_are_redacted_in_logs() -> None:
    url = with_credentials("rediss://old:secret@db.example:6380/0", "fl-agent-a1", "p@ss/word")
    assert url == "rediss://fl-agent-a1:p%40ss%2Fword@db.example:6380/0"
    assert redacted(url) == "rediss://fl-agent-a1:***@db.example:6380/0"


SERVICES_URL = "redis://fl-services:svc-pass@127.0.0.1:7000/0"
DASHBOARD_URL = "redis://fl-dashboard:dash-pass@127.0.0.1:7000/0"
API_KEY = "bootstrap-key-0123456789"


def children_and_secrets(tmp_path: Path) -> list[Child]:
    roles = write_role_secrets(tmp_path / "run" / "secrets", RoleUrls(SERVICES_URL, DASHBOARD_URL), API_KEY)
    return build_children(Settings(data_dir=tmp_path), None, roles, tmp_path)


def test_each_child_reads_its_roles_url_and_only_the_dashboard_the_api_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("FL_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "config.json"
    config.write_text("{}")
    seen = {}
    for child in children_and_secrets(tmp_path):
        monkeypatch.setenv(SECRETS_DIR_ENV, child.env[SECRETS_DIR_ENV])
        settings = load_settings(config)
        seen[child.name] = (settings.redis_url, settings.api_key)
    assert seen.pop("dashboard") == (DASHBOARD_URL, API_KEY)
    assert set(seen.values()) == {(SERVICES_URL, "")}


def test_no_childs_environment_holds_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FL_API_KEY", API_KEY)
    monkeypatch.setenv("FL_REDIS_URL", "redis://:launcher-pass@127.0.0.1:7000/0")
    monkeypatch.setenv("FL_REDIS_ADMIN_URL", "redis://admin:admin-pass@127.0.0.1:7000/0")
    children = children_and_secrets(tmp_path)

    for child in children:
        environment = "\n".join(f"{name}={value}" for name, value in child.env.items())
        for secret in ("svc-pass", "dash-pass", API_KEY, "launcher-pass", "admin-pass"):
            assert secret not in environment, (child.name, secret)
    for folder in {Path(child.env[SECRETS_DIR_ENV]) for child in children}:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o600}


def test_acl_mode_is_the_default_with_the_embedded_server_only() -> None:
    assert Settings().redis_acl
    assert not Settings(redis_url="redis://db.example:6379/0").redis_acl
    assert not Settings(redis_acl=False).redis_acl
    assert Settings(redis_url="redis://db.example:6379/0", redis_acl=True).redis_acl


def test_a_secrets_folder_that_does_not_exist_is_refused(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRETS_DIR_ENV, str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"FL_SECRETS_DIR is '{tmp_path / 'missing'}': no such folder"):
        load_settings(tmp_path / "config.json")


def test_prometheus_scrapes_an_https_dashboard_with_its_ca(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    text = prometheus_config(Settings(dashboard_tls_cert_file=cert, dashboard_tls_key_file=cert,
                                      dashboard_tls_ca_file=cert, dashboard_port=8443))
    dashboard_job = text.split("job_name: federated-learning-dashboard")[1]
    assert "scheme: https" in dashboard_job and f"ca_file: {cert.resolve()}" in dashboard_job
    assert '"127.0.0.1:8443"' in dashboard_job


def test_redis_tls_files_come_from_the_environment_for_agents(tmp_path: Path) -> None:
    tls = RedisTls.from_environment({"FL_REDIS_TLS_CA_FILE": "/ca.pem", "FL_REDIS_TLS_CERT_FILE": ""})
    assert tls == RedisTls(ca_file=Path("/ca.pem"))
    assert tls.redis_kwargs() == {"ssl_ca_certs": "/ca.pem"}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"redis_url": "rediss://h:1", "redis_tls_ca_file": "/nope.pem"},
     "config 'redis_tls_ca_file' is '/nope.pem': no such file"),
    ({"redis_url": "rediss://h:1", "redis_tls_cert_file": "{pem}"},
     "'redis_tls_cert_file' is set but 'redis_tls_key_file' is not"),
    ({"redis_tls_ca_file": "{pem}"}, "redis_url is not rediss:// (empty: the embedded server"),
    ({"redis_url": "redis://u:secret@h:1", "redis_tls_ca_file": "{pem}"}, "redis_url is not rediss:// (redis://)"),
    ({"dashboard_tls_key_file": "{pem}"}, "'dashboard_tls_key_file' is set but 'dashboard_tls_cert_file' is not"),
    ({"dashboard_tls_ca_file": "{pem}"}, "the dashboard serves plain HTTP"),
    ({"redis_acl_agents": ["ok", "no*"]}, "config 'redis_acl_agents.1' is 'no*'"),
])
def test_tls_and_acl_settings_are_validated_with_the_key_named(
        tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("x")
    values = {key: str(value).replace("{pem}", str(pem)) if isinstance(value, str) else value
              for key, value in overrides.items()}
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, **values)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)
