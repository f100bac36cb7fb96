"""The leak scan: run a whole workload, failures included, then look for every plaintext it
used (and any 12-character window of one) and the KEK material in every sink an attacker or an
operator could read: all Redis databases, every column of every table, worker/beat/CLI output,
Python log records at DEBUG, Flower's API, exception messages and tracebacks raised to callers,
and ``repr()``/``str()`` of every object the library hands out. Zero hits is the bar.

The redaction filter the worker and the CLI install is a second line of defence only: the
library logs at DEBUG with no filter here, so a hit means a secret reached a sink, not that a
filter missed it.
"""

from __future__ import annotations

import base64
import logging
import secrets
import traceback
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import inspect, select, text, update

from cuscred.cli import app
from cuscred.db.models import CREDENTIALS
from cuscred.errors import CuscredError
from cuscred.factory import Runtime
from cuscred.jobs.control import JobControl
from tests.test_flower import _Flower
from tests.worker_fixtures import (
    RedisServer,
    Stack,
    assert_no_secrets,
    free_port,
    kek_materials,
    seed,
    wait_for,
)

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _table_dump(runtime: Runtime) -> dict[str, str]:
    """Every row of every table as text; binary columns also as latin-1, hex and base64."""
    dump: dict[str, str] = {}
    with runtime.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()  # our own table names
            parts = []
            for row in rows:
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        raw = bytes(value)
                        parts += [raw.decode("latin-1"), raw.hex(), base64.b64encode(raw).decode()]
                    else:
                        parts.append(str(value))
            dump[f"table {table}"] = "\n".join(parts)
    return dump


def _all_redis(server: RedisServer) -> dict[str, str]:
    """Every key and value of every database of the test's Redis server."""
    dump: dict[str, str] = {}
    for db in range(16):
        client = server.client(db)
        for key in client.scan_iter(count=1000):
            values = _redis_values(client, key)
            body = "\n".join(v.decode("latin-1") for v in values)
            decoded = []
            for line in body.splitlines():  # kombu message bodies are base64 JSON
                for word in line.replace('"', " ").split():
                    try:
                        decoded.append(base64.b64decode(word, validate=True).decode("latin-1"))
                    except ValueError:
                        continue
            dump[f"redis db{db} {key.decode('latin-1')}"] = "\n".join([body, *decoded])
    return dump


def _redis_values(client: Any, key: bytes) -> list[bytes]:
    kind = client.type(key).decode()
    if kind == "string":
        return [client.get(key) or b""]
    if kind == "list":
        return list(client.lrange(key, 0, -1))
    if kind in ("set", "zset"):
        return list(client.smembers(key) if kind == "set" else client.zrange(key, 0, -1))
    if kind == "hash":
        return [b for kv in client.hgetall(key).items() for b in kv]
    return [kind.encode()]  # a stream or module type: its name at least shows in the dump


def _raised(texts: dict[str, str], name: str, call: Callable[[], object]) -> CuscredError:
    """Run ``call``, which must raise a typed error; keep its message and full traceback."""
    with pytest.raises(CuscredError) as info:
        call()
    exc = info.value
    texts[f"exception {name}"] = "\n".join([
        str(exc), repr(exc), "".join(traceback.format_exception(exc)),
        *(f"{c!s} {c!r}" for c in _chain(exc)),
    ])
    return exc


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def test_no_secret_reaches_any_sink(
    stack: Stack, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runtime = stack.runtime()
    data = seed(runtime, 400, 12)
    svc = runtime.credential_service(actor="leak-scan")
    texts: dict[str, str] = {}
    handed_out: list[object] = [runtime, svc, runtime.keys, runtime.audit, runtime.settings]

    # --- the library, as an app uses it, with its failures --------------------------------
    tenants = sorted({t for t, _, _ in data.rows.values()})
    items = list(data.rows.items())
    (cid_a, (tenant_a, plain_a, ctx_a)) = items[0]
    other = next(t for t in tenants if t != tenant_a)
    ref_a = f"encrypted://{cid_a}"
    assert svc.resolve_credential(tenant_a, ref_a, ctx_a) == plain_a
    handed_out += [svc.describe_credential(tenant_a, ref_a), *svc.list_credentials(tenant_a)]
    new_plain = "sk-proj-" + secrets.token_urlsafe(40)
    rotated = svc.rotate_credential(tenant_a, ref_a, new_plain, ctx_a)
    handed_out.append(rotated)
    plaintexts = [*data.plaintexts, new_plain]

    _raised(texts, "cross-tenant", lambda: svc.resolve_credential(other, ref_a, ctx_a))
    _raised(texts, "wrong context", lambda: svc.resolve_credential(tenant_a, ref_a, {"x": "y"}))
    for bad in (new_plain + " ", " " + new_plain, new_plain + "\n", new_plain + "\x00"):
        _raised(texts, f"bad secret {len(bad)}", lambda b=bad: svc.encrypt_credential(  # type: ignore[misc]
            tenant_a, b))
    _raised(texts, "rotate with bad secret",
            lambda: svc.rotate_credential(tenant_a, ref_a, new_plain + "\t", ctx_a))
    _raised(texts, "env ref", lambda: svc.resolve_credential(tenant_a, "env://DEV_SECRET_NOPE"))
    _raised(texts, "secret as reference", lambda: svc.resolve_credential(tenant_a, new_plain))
    # A secret pasted where the tenant id goes, made invalid by one character.
    _raised(texts, "secret as tenant", lambda: svc.encrypt_credential(new_plain + "/", new_plain))
    # A tampered row: its decryption fails, and so will its re-encryption below.
    (cid_b, (tenant_b, _, ctx_b)) = items[1]
    with runtime.engine.begin() as conn:
        blob = bytearray(conn.execute(select(CREDENTIALS.c.ciphertext).where(
            CREDENTIALS.c.credential_id == cid_b)).scalar_one())
        blob[-1] ^= 0x01
        conn.execute(update(CREDENTIALS).where(CREDENTIALS.c.credential_id == cid_b)
                     .values(ciphertext=bytes(blob)))
    _raised(texts, "tampered", lambda: svc.resolve_credential(tenant_b, f"encrypted://{cid_b}",
                                                              ctx_b))
    handed_out += [svc.mask_credential(new_plain), svc.validate_credential_format(ref_a)]

    # --- the CLI (stdin for secrets); its stderr and logs are sinks, resolve's stdout is not
    from typer.testing import CliRunner

    cli_env = {**stack.env, "CUSCRED_BROKER_URL": stack.env["CUSCRED_BROKER_URL"]}
    cli_secret = "sk-ant-api03-" + secrets.token_urlsafe(60)
    plaintexts.append(cli_secret)
    put = CliRunner().invoke(app, ["put", "--tenant", tenant_a], input=cli_secret + "\n",
                             env=cli_env)
    assert put.exit_code == 0, put.stderr
    cli_ref = put.stdout.strip()
    for args, stdin in ((["put", "--tenant", tenant_a], cli_secret + "  \n"),
                        (["resolve", "--tenant", other, cli_ref], None),
                        (["list", "--tenant", tenant_a], None),
                        (["mask"], cli_secret + "\n"),
                        (["rotate", "--tenant", tenant_a, cli_ref], " " + cli_secret + "\n")):
        result = CliRunner().invoke(app, args, input=stdin, env=cli_env)
        texts[f"cli {' '.join(args[:1])} {result.exit_code}"] = result.stdout + result.stderr

    # --- a KEK rotation on real workers, with Flower watching -------------------------------
    password = secrets.token_urlsafe(12)
    port = free_port()
    stack.flower(port=port, auth=f"ops:{password}")
    flower = _Flower(port, "ops", password)
    stack.workers(2)
    stack.beat()
    job_id, _ = runtime.rotation().rotate_kek(requested_by="leak-scan")
    job = stack.wait_job(job_id, timeout=120)
    assert (job.status, job.failed) == ("completed_with_errors", 1)
    handed_out += [job, JobControl(runtime.rotation()).verify(job_id=job_id, actor="leak-scan")]

    def flower_saw_everything() -> bool:
        tasks: dict[str, Any] = flower.get("/api/tasks")
        return len(tasks) >= 3 and all(t["state"] in ("SUCCESS", "FAILURE")
                                       for t in tasks.values())

    wait_for(flower_saw_everything, timeout=30, what="Flower to see the finished tasks")
    for task_id in list(flower.get("/api/tasks")):
        flower.get(f"/api/task/info/{task_id}")
    flower.get("/api/workers?refresh=1")

    # --- scan ---------------------------------------------------------------------------------
    texts.update(flower.texts)
    texts.update(stack.logs())
    texts.update(_table_dump(runtime))
    texts.update(_all_redis(redis_server))
    texts["log records"] = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    texts["handed out"] = "\n".join(f"{o!s} {o!r}" for o in handed_out)
    assert any(k.startswith("table audit_events") for k in texts)
    assert any("cuscred.tasks" in v or "chunk job=" in v for v in stack.logs().values())
    assert_no_secrets(texts, plaintexts, kek_materials(runtime, [1, 2]))
