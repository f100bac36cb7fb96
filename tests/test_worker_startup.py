"""Start-up checks of ``celery -A worker worker|beat|flower``: a configuration that could
deliver a running chunk twice, or any invalid setting, stops the process with one clear line
and exit status 78 instead of a traceback (or, worse, a worker running on Celery's defaults)."""

from __future__ import annotations

import pytest

from tests.worker_fixtures import Stack
from worker.app import EXIT_CONFIG

_TOO_SHORT = {  # visibility timeout equal to the hard time limit: a slow chunk runs twice
    "CUSCRED_BROKER_VISIBILITY_TIMEOUT_S": "60", "CUSCRED_CHUNK_TIME_LIMIT_S": "60",
    "CUSCRED_CHUNK_SOFT_TIME_LIMIT_S": "50", "CUSCRED_CHUNK_LEASE_S": "60",
}


def _refusal(stack: Stack, *args: str) -> str:
    result = stack.run(*args, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_CONFIG, output
    lines = [line for line in output.splitlines() if line.startswith("cuscred: ")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize("command", [
    ["worker", "-Q", "cuscred", "--without-mingle", "--without-gossip"],
    ["beat", "-s", "{workdir}/schedule"],
])
def test_visibility_timeout_not_above_hard_limit_refuses_to_start(
    stack: Stack, command: list[str]
) -> None:
    stack.env.update(_TOO_SHORT)
    line = _refusal(stack, *(a.format(workdir=stack.workdir) for a in command))
    assert line == (
        "cuscred: refusing to start: CUSCRED_BROKER_VISIBILITY_TIMEOUT_S (60) must exceed "
        "CUSCRED_CHUNK_TIME_LIMIT_S (60), or Redis would deliver a running chunk task a second "
        "time")
    # One second more and the same worker starts.
    stack.env["CUSCRED_BROKER_VISIBILITY_TIMEOUT_S"] = "61"
    if command[0] == "worker":
        stack.worker()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("command", "change", "named"), [
    ("worker", {"CUSCRED_CHUNK_SIZE": "0"}, "CUSCRED_CHUNK_SIZE"),
    ("worker", {"CUSCRED_NO_SUCH_SETTING": "1"}, "CUSCRED_NO_SUCH_SETTING"),
    ("beat", {"CUSCRED_KEK_SOURCE": "vault"}, "CUSCRED_VAULT_TOKEN"),  # and no token
    ("flower", {"CUSCRED_ENV": "production"}, "CUSCRED_VAULT_TOKEN"),
])
def test_invalid_settings_refuse_to_start(
    stack: Stack, command: str, change: dict[str, str], named: str
) -> None:
    stack.env.update(change)
    line = _refusal(stack, command)
    assert line.startswith("cuscred: refusing to start: ") and named in line


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_missing_broker_url_refuses_to_start(stack: Stack) -> None:
    del stack.env["CUSCRED_BROKER_URL"]
    line = _refusal(stack, "worker")
    assert line == "cuscred: refusing to start: CUSCRED_BROKER_URL must be set to run the " \
                   "worker or beat"
