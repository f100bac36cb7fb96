"""The README's runbooks as the tests run them: each ```sh block marked
``<!-- runbook: NAME -->`` is run exactly as written, by ``bash -euo pipefail``, with this
virtualenv's ``cuscred`` first on the PATH, the test's ``CUSCRED_*`` settings and the shell
variables the block names (``"$TENANT"``, ``"$JOB"``, …). ``-u`` makes a variable the test
forgot to set an error, not an empty string.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.worker_fixtures import process_env

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent  # the virtualenv's bin/: cuscred, celery
_BLOCK = re.compile(r"<!-- runbook: ([a-z0-9-]+) -->\n```sh\n(.*?)```", re.DOTALL)


def runbooks() -> dict[str, str]:
    """Every marked block of the README, by name (a name used twice is an error)."""
    found: dict[str, str] = {}
    for name, body in _BLOCK.findall(README.read_text()):
        assert name not in found, f"runbook {name!r} is marked twice in README.md"
        found[name] = body
    return found


@dataclass(frozen=True)
class Ran:
    name: str
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __str__(self) -> str:
        return (f"runbook {self.name} exited {self.code}\n--- stdout ---\n{self.stdout}"
                f"--- stderr ---\n{self.stderr}")


def run_runbook(
    name: str, *, cwd: Path, settings: Mapping[str, str], variables: Mapping[str, str] = {},
    timeout: float = 180.0, env_out: Path | None = None,
) -> Ran:
    """Run README block ``name`` in ``cwd``; fail the test unless it exits 0.

    ``settings`` are the ``CUSCRED_*`` variables of the installation, ``variables`` the
    block's placeholders. With ``env_out``, the shell's environment as the block left it is
    written there (``env -0``), so that the next block can go on in the same shell state.
    """
    script = runbooks()[name]
    if env_out is not None:
        script += f'env -0 > "{env_out}"\n'
    env = process_env({**settings, **variables})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )
    ran = Ran(name, result.returncode, result.stdout, result.stderr)
    assert ran.code == 0, str(ran)
    return ran


def read_env(path: Path) -> dict[str, str]:
    """An environment written by ``env -0``."""
    pairs = (item.split("=", 1) for item in path.read_text().split("\0") if "=" in item)
    return dict(pairs)


__all__ = ["BIN", "README", "Ran", "read_env", "run_runbook", "runbooks"]
