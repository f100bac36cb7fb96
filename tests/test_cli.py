"""The CLI as a shell user drives it: stdin for secrets, exit codes, masked listings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cuscred.cli import app
from tests.conftest import Database

SECRET = "sk-proj-" + "Qw3rTy9" * 20 + "Lm0p"


@pytest.fixture
def cli_env(database: Database, tmp_path: Path) -> dict[str, str]:
    return {
        "CUSCRED_DATABASE_URL": database.url,
        "CUSCRED_KEYRING_PATH": str(tmp_path / "keyring.json"),
    }


def run(env: dict[str, str], *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), input=stdin, env=env)
    return result.exit_code, result.stdout, result.stderr


def test_store_resolve_refuse_list(cli_env: dict[str, str]) -> None:
    assert run(cli_env, "keygen")[0] == 0
    assert run(cli_env, "keygen")[0] == 78  # never overwrites
    code, ref, _ = run(cli_env, "put", "--tenant", "acme", stdin=SECRET + "\n")
    assert code == 0 and ref.strip().startswith("encrypted://cred_")
    ref = ref.strip()
    code, out, _ = run(cli_env, "resolve", "--tenant", "acme", ref)
    assert (code, out) == (0, SECRET + "\n")
    code, out, err = run(cli_env, "resolve", "--tenant", "globex", ref)
    assert code == 3 and SECRET not in out + err and "no credential" in err
    code, out, _ = run(cli_env, "list", "--tenant", "acme")
    assert code == 0 and "sk-proj-…Lm0p" in out and SECRET[8:20] not in out
    from cuscred.cli.common import out_console

    width = out_console.width
    out_console.width = 80  # an 80-column terminal: the reference is what one copies out
    try:
        out = run(cli_env, "list", "--tenant", "acme")[1]
    finally:
        out_console.width = width
    assert ref in out and max(len(line) for line in out.splitlines()) <= 80
    code, out, _ = run(cli_env, "list", "--tenant", "acme", "--json")
    assert json.loads(out)[0]["reference"] == ref
    code, out, _ = run(cli_env, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["rows_checked"] == 3
    head = f"{report['head_seq']}:{report['head_mac']}"
    assert run(cli_env, "audit", "verify", "--expect-head", head)[0] == 0
    assert run(cli_env, "audit", "verify", "--expect-head", "99:" + "0" * 64)[0] == 8


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (SECRET + "\n", 0),  # echo's newline is the line terminator, not part of the value
        (SECRET + "\r\n", 0),
        (SECRET + " \n", 6),
        (" " + SECRET, 6),
        (SECRET + "\n\n", 6),
        ("", 6),
        ("sk-\x00" + "a" * 30, 6),
    ],
)
def test_put_input_rules(cli_env: dict[str, str], stdin: str, code: int) -> None:
    run(cli_env, "keygen")
    result = run(cli_env, "put", "--tenant", "acme", stdin=stdin)
    assert result[0] == code
    if code:
        assert SECRET[8:30] not in result[1] + result[2]


def test_strip_flag(cli_env: dict[str, str]) -> None:
    run(cli_env, "keygen")
    code, ref, _ = run(cli_env, "put", "--tenant", "acme", "--strip", stdin=f"  {SECRET}  \n")
    assert code == 0
    assert run(cli_env, "resolve", "--tenant", "acme", ref.strip())[1] == SECRET + "\n"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["validate", "vault://secret/tenants/acme/openai#api_key"], 0),
        (["validate", "vault://kv/tenants/a/../b/x#k"], 6),
        (["validate", "encrypted://not-an-id"], 6),
        (["resolve", "--tenant", "acme", "vault://secret/tenants/other/x#k"], 4),
        (["resolve", "--tenant", "a/b", "encrypted://cred_" + "0" * 26], 6),
        (["resolve", "--tenant", "acme", "env://HOME"], 4),
        (["mask", "sk-proj-looks-like-a-secret"], 6),  # secrets are never taken from argv
        (["keys", "retire", "1"], 7),
        (["keys", "promote", "7"], 7),  # unregistered: step 1 (create) comes first
    ],
)
def test_exit_codes(cli_env: dict[str, str], args: list[str], code: int) -> None:
    run(cli_env, "keygen")
    run(cli_env, "put", "--tenant", "acme", stdin=SECRET)
    assert run(cli_env, *args)[0] == code


def test_rotate_and_keys(cli_env: dict[str, str]) -> None:
    run(cli_env, "keygen")
    ref = run(cli_env, "put", "--tenant", "acme", stdin=SECRET)[1].strip()
    code, _, err = run(cli_env, "rotate", "--tenant", "acme", ref, stdin=SECRET)
    assert code == 0 and "unchanged" in err
    assert run(cli_env, "keys", "create")[1].strip() == "2"
    assert run(cli_env, "keys", "promote", "2")[0] == 0
    code, _, err = run(cli_env, "rotate", "--tenant", "acme", ref, stdin=SECRET[:-1] + "X")
    assert code == 0 and "rotated" in err
    status = json.loads(run(cli_env, "keys", "status", "--json", "--tenants")[1])
    assert [(v["version"], v["state"], v["credentials"]) for v in status["kek_versions"]] == [
        (1, "decrypt_only", 0), (2, "active", 1)]
    assert status["tenant_generations"][0]["credentials"] == 1
    assert run(cli_env, "keys", "retire", "1")[0] == 0


def test_missing_keyring_is_a_clear_configuration_error(cli_env: dict[str, str]) -> None:
    code, _, err = run(cli_env, "put", "--tenant", "acme", stdin=SECRET)
    assert code == 78 and "cuscred keygen" in err


def test_installed_entry_point_runs(cli_env: dict[str, str]) -> None:
    exe = Path(sys.executable).with_name("cuscred")
    env = {**os.environ, **cli_env}
    subprocess.run([exe, "keygen"], env=env, check=True, capture_output=True)
    done = subprocess.run([exe, "put", "--tenant", "acme"], env=env, input=SECRET,
                          text=True, capture_output=True, check=True)
    assert done.stdout.startswith("encrypted://")


def test_stored_text_is_never_rendered_as_markup(cli_env: dict[str, str]) -> None:
    run(cli_env, "keygen")
    markup = '{"type": "service_account", "client_email": "[/bold][red]x@y.iam"}'
    code, ref, _ = run(cli_env, "put", "--tenant", "acme", "--context", "purpose=[/bold]",
                       stdin=markup)
    assert code == 0
    code, out, _ = run(cli_env, "show", "--tenant", "acme", ref.strip())
    assert code == 0 and "[/bold]" in out
    code, out, _ = run(cli_env, "list", "--tenant", "acme")
    assert code == 0 and "[/bold][red]x@y.iam" in out


def test_expect_head_checks_the_anchored_row(cli_env: dict[str, str]) -> None:
    run(cli_env, "keygen")
    run(cli_env, "put", "--tenant", "acme", stdin=SECRET)
    assert run(cli_env, "audit", "verify", "--expect-head", "1:deadbeef")[0] == 8
    assert run(cli_env, "audit", "verify", "--expect-head", "nonsense")[0] == 6


def test_keygen_refuses_when_the_database_records_keys(cli_env: dict[str, str]) -> None:
    run(cli_env, "keygen")
    run(cli_env, "db", "upgrade")
    run(cli_env, "put", "--tenant", "acme", stdin=SECRET)
    Path(cli_env["CUSCRED_KEYRING_PATH"]).unlink()  # the keyring was lost
    code, _, err = run(cli_env, "keygen")
    assert code == 78 and "restore the keyring" in err
    assert not Path(cli_env["CUSCRED_KEYRING_PATH"]).exists()


def test_database_down_is_exit_69(tmp_path: Path) -> None:
    env = {"CUSCRED_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere",
           "CUSCRED_KEYRING_PATH": str(tmp_path / "k.json")}
    run(env, "keygen")
    for args in (["list", "--tenant", "acme"], ["resolve", "--tenant", "acme",
                                                "encrypted://cred_" + "0" * 26],
                 ["keys", "status"], ["audit", "verify"]):
        code, _, err = run(env, *args)
        assert code == 69, (args, err)


def test_the_cli_redacts_key_shapes_that_a_library_might_log(tmp_path: Path) -> None:
    """The redaction filter is installed on the CLI's log handler (second line of defence)."""
    script = (
        "import logging; from cuscred.cli.common import quiet_logging; quiet_logging(); "
        f"logging.getLogger('thirdparty').warning('sending %s', {SECRET!r})"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, cwd=tmp_path)
    assert "sending [REDACTED]" in result.stderr and SECRET[8:20] not in result.stderr


def test_mask_json(cli_env: dict[str, str]) -> None:
    code, out, _ = run(cli_env, "mask", "--json", stdin=SECRET + "\n")
    assert code == 0 and json.loads(out) == {"masked": "sk-proj-…Lm0p"}


def test_a_declined_confirmation_changes_nothing_and_says_so(cli_env: dict[str, str]) -> None:
    assert run(cli_env, "keygen")[0] == 0
    ref = run(cli_env, "put", "--tenant", "acme", stdin=SECRET + "\n")[1].strip()
    for answer in ("n\n", ""):  # "no", and no answer at all (stdin closed)
        code, _, err = run(cli_env, "delete", "--tenant", "acme", ref, stdin=answer)
        assert code == 10 and "nothing changed" in err
        code, _, err = run(cli_env, "shred-tenant", "acme", stdin=answer)
        assert code == 10 and "nothing changed" in err
    assert run(cli_env, "resolve", "--tenant", "acme", ref)[1] == SECRET + "\n"
    assert run(cli_env, "delete", "--tenant", "acme", ref, stdin="y\n")[0] == 0


def test_context_options_must_be_key_value_and_name_each_key_once(
    cli_env: dict[str, str],
) -> None:
    assert run(cli_env, "keygen")[0] == 0
    for context in (["p=x", "p=y"], ["noequals"]):
        args = [a for c in context for a in ("--context", c)]
        code, out, err = run(cli_env, "put", "--tenant", "acme", *args, stdin=SECRET + "\n")
        assert code == 6 and not out and "--context option" in err
    code, out, _ = run(cli_env, "list", "--tenant", "acme", "--json")
    assert json.loads(out) == []


def test_a_key_shaped_actor_is_refused_before_anything_runs(cli_env: dict[str, str]) -> None:
    key = "AKIAIOSFODNN7EXAMPLE"
    assert run(cli_env, "keygen")[0] == 0
    assert run(cli_env, "put", "--tenant", "acme", stdin=SECRET + "\n")[0] == 0  # v1 recorded
    for args in (["keys", "create"], ["kek", "rotate"], ["reencrypt"], ["rekey", "acme"]):
        code, out, err = run(cli_env, "--actor", key, *args)
        assert code == 6 and key not in out + err and "API key" in err
    code, out, _ = run(cli_env, "keys", "status", "--json")
    assert [v["version"] for v in json.loads(out)["kek_versions"]] == [1]
    code, out, _ = run(cli_env, "jobs", "--json")
    assert json.loads(out) == []
