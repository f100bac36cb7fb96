"""`make demo` at a small size: the main job runs on the embedded default and its summary adds
up (every stored row moved, the old KEK version retired, everything verifies)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cuscred import demo


def test_demo_summary_adds_up(tmp_path: Path) -> None:
    out = io.StringIO()
    summary = demo.run(tmp_path / "demo", 300, 20, Console(file=out, width=120))
    demo.print_summary(summary, Console(file=out, width=120))
    text = out.getvalue()
    stored = 300 + 3  # the generated set and the three credentials of the opening section
    assert summary.stored == stored and summary.status == "completed"
    assert summary.done + summary.skipped + summary.failed == summary.total == stored
    assert (summary.skipped, summary.failed) == (0, 0) and summary.rows_per_s > 0
    assert summary.census_before == {1: stored}
    assert summary.census_after == {1: 0, 2: stored}
    assert summary.states_after == {1: "retired", 2: "active"} and summary.retired == [1]
    assert summary.sample_checked == demo.SAMPLE and summary.verified == stored
    assert summary.verify_failures == 0 and summary.audit_ok
    # One audit event per stored and per re-encrypted row, plus the job and key-state events.
    assert summary.audit_rows > 2 * stored
    assert demo.ok(summary)
    assert "refused: CredentialNotFoundError" in text and "100%" in text
    assert f"done {stored} + skipped 0 + failed 0 = total {stored}" in text
    assert "sk-proj-…" in text and "KEK v1 retired" in text
    assert (tmp_path / "demo" / "keyring.json").stat().st_mode & 0o777 == 0o600


def test_demo_command_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cuscred.demo", "--credentials", "60", "--tenants", "6",
         "--workdir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "done 63 + skipped 0 + failed 0 = total 63" in done.stdout
    assert "chain OK" in done.stdout


def test_demo_refuses_impossible_sizes() -> None:
    with pytest.raises(SystemExit) as exc:
        demo.main(["--credentials", "5", "--tenants", "10"])
    assert exc.value.code == 2
