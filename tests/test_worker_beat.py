"""Two ``celery -A worker beat`` processes (a deploy overlap, a misconfigured replica count)
both find the KEK due for rotation: exactly one rotation happens."""

from __future__ import annotations

import ast
import re
from datetime import timedelta

from sqlalchemy import select, update

from cuscred.db.models import KEK_VERSIONS, ROTATION_JOBS, utcnow
from cuscred.kek.local import LocalKeyring
from tests.worker_fixtures import Stack, assert_rows_readable, seed
from worker.config import TASK_CHECK_ROTATION_DUE

_CHECKED = re.compile(rf"Task {re.escape(TASK_CHECK_ROTATION_DUE)}\[[^\]]+\] succeeded in "
                      r"[\d.e-]+s: (\{.*\})")


def test_two_beats_start_exactly_one_rotation(stack: Stack) -> None:
    runtime = stack.runtime()
    data = seed(runtime, 300, 10)
    # The active KEK was activated 100 days ago: past the default maximum age of 90 days.
    with stack.database.engine.begin() as conn:
        conn.execute(update(KEK_VERSIONS).values(activated_at=utcnow() - timedelta(days=100)))
    worker = stack.worker(concurrency=2)

    beats = [stack.beat(), stack.beat()]
    for beat in beats:  # each beat checks once at start-up (and daily after that)
        beat.wait_for_log(r"start-up rotation-due check sent")
    worker.wait_for_log(_CHECKED.pattern, count=2)

    with stack.observer.connect() as conn:
        jobs = conn.execute(select(ROTATION_JOBS)).all()
    assert [(j.kind, j.requested_by) for j in jobs] == [("kek_rotation", "beat")]
    job = stack.wait_job(jobs[0].id)
    assert (job.status, job.total, job.done, job.target_kek_version) == ("completed", 300, 300, 2)
    # Both checks ran; each answered with the one job (or found nothing due any more).
    answers = [ast.literal_eval(m) for m in _CHECKED.findall(worker.log())]
    assert len(answers) == 2 and {a["job_id"] for a in answers} <= {job.id, None}
    assert all(beat.running for beat in beats)

    # One new KEK version was written, not two; it is the active one.
    assert LocalKeyring(runtime.settings.keyring_path).latest_version() == 2
    with stack.observer.connect() as conn:
        states = dict(conn.execute(select(KEK_VERSIONS.c.version, KEK_VERSIONS.c.state)).all())
        assert conn.execute(select(ROTATION_JOBS.c.id)).all() == [(job.id,)]
    assert states == {1: "decrypt_only", 2: "active"}
    assert_rows_readable(runtime, data, kek_version=2)
