"""Flower (``celery -A worker flower``) against the test's Redis: it sees our tasks, its HTTP API
needs the basic-auth credentials, and nothing it shows, nor anything left in Redis, holds a
secret: task arguments are ids, results are counts."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import pytest

from cuscred.jobs.celery_runner import TASK_ADVANCE, TASK_CHUNK, TASK_FINALIZE, TASK_START
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


class _Flower:
    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = {"Authorization": f"Basic {token}"}
        self.texts: dict[str, str] = {}  # every body read, for the leak scan

    def status(self, path: str, *, auth: bool) -> int:
        request = urllib.request.Request(self.base + path, headers=self._auth if auth else {})
        try:
            with _HTTP.open(request, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers=self._auth)
        with _HTTP.open(request, timeout=10) as r:
            body = r.read().decode()
        self.texts[path] = body
        return json.loads(body)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_flower_lists_our_tasks_and_no_secret(stack: Stack, redis_server: RedisServer) -> None:
    runtime = stack.runtime()
    data = seed(runtime, 600, 20)
    password = secrets.token_urlsafe(12)
    port = free_port()
    stack.flower(port=port, auth=f"ops:{password}")
    flower = _Flower(port, "ops", password)
    assert flower.status("/api/tasks", auth=False) == 401
    assert flower.status("/api/tasks", auth=True) == 200

    job_id, _ = runtime.rotation().rotate_kek(requested_by="test")
    queued = _redis_dump(redis_server, stack)  # the first step's message, before any worker
    assert any(TASK_ADVANCE in v and f"[[{job_id}], {{}}" in v for v in queued.values()), queued
    stack.worker(concurrency=2)
    job = stack.wait_job(job_id)
    assert (job.status, job.done) == ("completed", 600)

    def chunk_tasks_seen() -> dict[str, Any] | None:
        tasks: dict[str, Any] = flower.get("/api/tasks")
        done = {k: t for k, t in tasks.items()
                if t["name"] == TASK_CHUNK and t["state"] == "SUCCESS"}
        finalized = any(t["name"] == TASK_FINALIZE and t["state"] == "SUCCESS"
                        for t in tasks.values())
        return tasks if len(done) == 6 and finalized else None

    tasks = wait_for(chunk_tasks_seen, timeout=30, what="Flower to show six finished chunks",
                     details=lambda: json.dumps(flower.get("/api/tasks"), indent=1)[:4000])
    names = Counter(t["name"] for t in tasks.values())
    # Two chunks finishing together may both ask for the (idempotent) finalize step.
    assert names.pop(TASK_FINALIZE) >= 1
    assert names == {TASK_ADVANCE: 1, TASK_START: 1, TASK_CHUNK: 6}

    chunk_args = set()
    for task_id, task in tasks.items():
        info = flower.get(f"/api/task/info/{task_id}")
        assert info["uuid"] == task_id and info["state"] == "SUCCESS"
        # Arguments are ids only; results are ids and counts.
        args = json.loads(info["args"].replace("(", "[").replace(")", "]").replace(",]", "]"))
        assert all(isinstance(a, int) for a in args), info["args"]
        assert info["kwargs"] in ("{}", {}), info["kwargs"]
        if task["name"] == TASK_CHUNK:
            chunk_args.add(tuple(args))
            assert "'status': 'done'" in info["result"]
    assert chunk_args == {(job_id, n) for n in range(1, 7)}

    flower.get("/api/workers?refresh=1")
    keks = kek_materials(runtime, [1, 2])
    assert_no_secrets(flower.texts, data.plaintexts, keks)
    assert_no_secrets(stack.logs(), data.plaintexts, keks)
    assert_no_secrets({**queued, **_redis_dump(redis_server, stack)}, data.plaintexts, keks)


def test_leak_scan_finds_a_piece_of_a_secret() -> None:
    """The scanner itself: twelve characters of a key's random part are found; JSON structure
    shared by every generated service-account document is not mistaken for a secret."""
    secret = "sk-proj-" + "Q7dLx2Vb9TzK4mWc" * 4
    vertex = '{\n  "type": "service_account",\n  "project_id": "abc"\n}'
    assert_no_secrets({"log": 'ok "type": "service_account"'}, [vertex])
    with pytest.raises(pytest.fail.Exception, match="12 characters of a secret in log"):
        assert_no_secrets({"log": "key=" + secret[20:32] + " end"}, [secret])
    with pytest.raises(pytest.fail.Exception, match="KEK material in log"):
        assert_no_secrets({"log": "k=abc"}, [], ["abc"])


def _redis_dump(server: RedisServer, stack: Stack) -> dict[str, str]:
    """Every key and value of the test's Redis database as text, message bodies decoded."""
    db = int(stack.env["CUSCRED_BROKER_URL"].rsplit("/", 1)[1])
    client = server.client(db)
    dump: dict[str, str] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        elif kind == "hash":
            values = [b for kv in client.hgetall(key).items() for b in kv]
        assert values is not None, kind
        texts = [v.decode(errors="replace") for v in values]
        dump[key.decode()] = "\n".join([key.decode(), *texts, *map(_decoded_body, texts)])
    assert dump, "the broker database is empty: wrong database?"
    return dump


def _decoded_body(text: str) -> str:
    """A kombu message's base64 body, decoded ('' if the value is not such a message)."""
    try:
        message = json.loads(text)
        return base64.b64decode(message["body"]).decode(errors="replace")
    except (ValueError, KeyError, TypeError, binascii.Error):
        return ""
