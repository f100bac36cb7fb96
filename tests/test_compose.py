"""docker-compose.yml and the Dockerfile, checked without Docker: the file is parsed with PyYAML,
``${VAR:-default}`` interpolated as Compose does, and every setting it passes is validated by
:class:`cuscred.config.Settings` itself."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from cuscred.config import ENV_PREFIX, Environment, KekSourceKind, Settings
from cuscred.jobs.celery_runner import QUEUE
from worker.config import check_visibility_timeout

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("migrate", "worker", "beat", "flower")
#: Host variables the file insists on (``${NAME:?...}``): none has a safe default.
REQUIRED_HOST_VARS = {"FLOWER_BASIC_AUTH": "ops:test-password"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _interpolate(value: Any, host: dict[str, str]) -> Any:
    """Compose's interpolation of ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}``
    (``$$`` is a literal ``$``), applied to every string in the document."""
    if isinstance(value, dict):
        return {k: _interpolate(v, host) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, host) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        current = host.get(name)
        if op in (":-", "-"):
            return current if current else (arg or "")
        if op in (":?", "?") and not current:
            raise KeyError(f"{name} is required: {arg}")
        return current or ""

    parts = value.split("$$")
    return "$".join(_VAR.sub(substitute, part) for part in parts)


def _load(host: dict[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return dict(_interpolate(doc, REQUIRED_HOST_VARS if host is None else host))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load()


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _plain(value: object) -> str:
    """A setting's text, whether the field is a ``SecretStr`` or not."""
    reveal = getattr(value, "get_secret_value", None)
    return str(reveal() if reveal is not None else value)


def _settings_of(service: dict[str, Any]) -> Settings:
    env = {k: str(v) for k, v in service["environment"].items() if k.startswith(ENV_PREFIX)}
    return Settings.from_env(env)


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "postgres", "redis", "openbao", "migrate", "worker", "beat", "flower"}


def test_every_cuscred_name_is_a_setting() -> None:
    """Any ``CUSCRED_*`` name in the file (keys and interpolations alike) is a real setting."""
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    used = set(re.findall(r"\bCUSCRED_[A-Z0-9_]+\b", COMPOSE.read_text()))
    assert used, "no settings at all?"
    assert used <= fields, sorted(used - fields)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_get_valid_production_settings(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    settings = _settings_of(service)  # raises on any invalid or unknown setting
    assert settings.env is Environment.PRODUCTION
    assert settings.kek_source is KekSourceKind.VAULT
    assert settings.vault_token is not None
    assert settings.vault_addr == "http://openbao:8200"
    database_url = _plain(settings.database_url)
    assert database_url.startswith("postgresql://") and "@postgres:5432/" in database_url
    assert _plain(settings.broker_url) == "redis://redis:6379/0"
    check_visibility_timeout(settings)  # the worker would refuse to start otherwise
    # The same settings everywhere (a worker and the beat that feeds it must agree), except
    # the metrics endpoint, which only the worker serves.
    worker_only = {"metrics_port", "metrics_addr"}
    worker = _settings_of(compose["services"]["worker"])
    assert settings.model_dump(exclude=worker_only) == worker.model_dump(exclude=worker_only)
    assert worker.metrics_port == 9808 and worker.metrics_addr == "0.0.0.0"


def test_openbao_dev_mode_token_is_the_one_the_apps_use(compose: dict[str, Any]) -> None:
    command = _command(compose["services"]["openbao"])
    assert command[:2] == ["server", "-dev"]
    token = next(a.split("=", 1)[1] for a in command if a.startswith("-dev-root-token-id="))
    assert _plain(_settings_of(compose["services"]["worker"]).vault_token) == token
    # The token can be chosen on the host; both ends follow it.
    other = _load({**REQUIRED_HOST_VARS, "BAO_DEV_ROOT_TOKEN": "another-token"})
    assert "-dev-root-token-id=another-token" in _command(other["services"]["openbao"])
    assert other["services"]["worker"]["environment"]["CUSCRED_VAULT_TOKEN"] == "another-token"


def test_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker = _command(services["worker"])
    assert worker[:4] == ["celery", "-A", "worker", "worker"]
    assert worker[worker.index("-Q") + 1] == QUEUE
    assert _command(services["beat"])[:4] == ["celery", "-A", "worker", "beat"]
    assert _command(services["flower"])[:4] == ["celery", "-A", "worker", "flower"]
    migrate = " ".join(_command(services["migrate"]))
    assert "cuscred db upgrade" in migrate and "cuscred keys create" in migrate
    assert services["migrate"]["restart"] == "no"


def test_flower_requires_basic_auth_from_the_environment(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == REQUIRED_HOST_VARS["FLOWER_BASIC_AUTH"]
    assert not any(a.startswith("--basic-auth") for a in _command(flower))  # not in argv
    with pytest.raises(KeyError, match="FLOWER_BASIC_AUTH is required"):
        _load({})
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])


def test_dependencies_wait_for_health_and_the_migration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("worker", "beat", "flower"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "redis": {"condition": "service_healthy"},
            "openbao": {"condition": "service_healthy"},
        }, name
    assert services["migrate"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "openbao": {"condition": "service_healthy"},
    }
    for name in ("postgres", "redis", "openbao", "worker", "flower"):
        assert services[name]["healthcheck"]["test"], name
    worker_check = " ".join(services["worker"]["healthcheck"]["test"])
    assert "inspect ping -d worker@$HOSTNAME" in worker_check  # the -n worker@%h node name
    assert "worker@%h" in _command(services["worker"])


def test_dockerfile_installs_the_lock_and_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert "pip install --require-hashes -r requirements.lock" in text
    assert re.search(r"pip install --no-deps --no-build-isolation -e \.", text)
    for path in ("alembic.ini", "migrations", "cuscred", "worker", "tasks"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path
        assert (ROOT / path).exists()
    assert re.search(r"^USER (?!root)\S+", text, re.M)
