"""A real OpenBao dev server in a subprocess, for integration tests.

``bao server -dev`` runs in memory, starts initialised and unsealed with one unseal key (printed
on stdout, captured here) and a root token whose id we choose. Audit devices can only be enabled
from configuration in OpenBao 2.x, so the file audit device comes from a ``-config`` file, which
``-dev`` accepts alongside its own flags.

Dev mode is in memory: :meth:`OpenBaoServer.restart` (stop, start on the same port) loses every
mount, secret, policy and token except the root token and the default ``secret/`` KV v2 mount,
and the unseal key changes. A persistent mode was not built: OpenBao 2.x has no ``file``
storage backend, and ``raft`` took ~9 s to initialise. Seal/unseal keeps the data (same process).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_BINARY = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "bao"
_UNSEAL_KEY = re.compile(r"^Unseal Key: (\S+)$", re.MULTILINE)
# No proxy from the environment: the server is on 127.0.0.1.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port_pair() -> int:
    """A port P such that P and P+1 (dev mode's cluster port) are free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port < 65535 and _is_free(port + 1):
            return port
    raise RuntimeError("no free pair of ports")


def _thread_stopped(task: Path) -> bool:
    try:
        # /proc/<pid>/task/<tid>/stat: "tid (comm) STATE ..."; comm may contain spaces.
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True  # the thread is gone
    return state in ("T", "t")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class OpenBaoServer:
    """One ``bao server -dev`` process. Not thread-safe; one per test or per session."""

    def __init__(
        self,
        workdir: Path,
        token: str,
        *,
        audit: bool = True,
        binary: Path = DEFAULT_BINARY,
        port: int | None = None,
    ) -> None:
        if not binary.exists():
            raise FileNotFoundError(f"OpenBao binary {binary} is missing: run `make venv`")
        self.workdir = Path(workdir)
        self.token = token
        self.binary = binary
        self.port = port or free_port_pair()
        self.audit_log_path: Path | None = self.workdir / "audit.log" if audit else None
        self.unseal_key: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdout_path = self.workdir / "bao.out"

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it is unsealed, active and its unseal key printed."""
        if self.running:
            raise RuntimeError("OpenBao is already running")
        args = [
            str(self.binary), "server", "-dev",
            f"-dev-root-token-id={self.token}",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            "-dev-no-store-token",  # do not write ~/.bao-token
        ]  # fmt: skip
        if self.audit_log_path is not None:
            args.append(f"-config={self._write_audit_config()}")
        out = self._stdout_path.open("wb")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.workdir)}
        self._proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        self._wait_started(timeout)

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 10 s). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case a test paused it
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop and start on the same port. Dev mode: all data is lost (see module docstring)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections are accepted by the kernel, never answered.

        Returns once every thread is stopped: delivery is asynchronous, and a Go thread still
        running could answer one more request.
        """
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self._proc.pid}/task")
        deadline = time.monotonic() + 10
        while not all(_thread_stopped(t) for t in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise TimeoutError("OpenBao did not stop after SIGSTOP")
            time.sleep(0.01)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def seal(self) -> None:
        """Seal the server (``PUT sys/seal`` with the root token); data stays in memory."""
        self._api("PUT", "sys/seal")

    def unseal(self) -> None:
        """Unseal with the key captured at start and wait until the server is active again."""
        assert self.unseal_key is not None
        self._api("PUT", "sys/unseal", {"key": self.unseal_key})
        self._wait_healthy(30.0)

    # --- audit log ----------------------------------------------------------------------------

    def audit_entries(self) -> list[dict[str, Any]]:
        """Every JSON line of the file audit device so far (request and response entries)."""
        if self.audit_log_path is None:
            raise RuntimeError("this server was started without the audit device")
        if not self.audit_log_path.exists():
            return []
        lines = self.audit_log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def requests_to(self, api_path: str, operation: str | None = None) -> list[dict[str, Any]]:
        """Request entries (one per HTTP request) for ``api_path``, e.g. ``secret/data/a/b``."""
        return [
            e["request"]
            for e in self.audit_entries()
            if e.get("type") == "request"
            and e["request"].get("path") == api_path
            and (operation is None or e["request"].get("operation") == operation)
        ]

    def kv_reads(self, mount: str, path: str) -> int:
        """How many KV v2 data reads of ``mount``/``path`` the server has audited."""
        return len(self.requests_to(f"{mount}/data/{path}", "read"))

    # --- internals ----------------------------------------------------------------------------

    def _write_audit_config(self) -> Path:
        assert self.audit_log_path is not None
        config = self.workdir / "audit.hcl"
        config.write_text(
            'audit "file" "test" {\n'
            f"  options {{\n    file_path = {json.dumps(str(self.audit_log_path))}\n  }}\n"
            "}\n"
        )
        return config

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.unseal_key = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self._proc.returncode}:\n{self._output()}")
            found = _UNSEAL_KEY.search(self._output())
            if found and self._health() == 200:
                self.unseal_key = found.group(1)
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"OpenBao did not start within {timeout}s:\n{self._output()}")

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._health() != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"OpenBao not healthy after {timeout}s")
            time.sleep(0.05)

    def _output(self) -> str:
        return self._stdout_path.read_text(errors="replace")

    def _health(self) -> int | None:
        """HTTP status of sys/health: 200 active, 503 sealed, None if unreachable."""
        try:
            with _HTTP.open(f"{self.addr}/v1/sys/health", timeout=1) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        request = urllib.request.Request(
            f"{self.addr}/v1/{path}",
            data=json.dumps(body or {}).encode(),
            method=method,
            headers={"X-Vault-Token": self.token, "Content-Type": "application/json"},
        )
        with _HTTP.open(request, timeout=10):
            pass
