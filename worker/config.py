"""Celery configuration derived from cuscred's settings (CUSCRED_* environment variables)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from cuscred.config import Settings
from cuscred.errors import ConfigurationError
from cuscred.jobs.celery_runner import QUEUE, TASK_CHUNK
from cuscred.services.health import visibility_timeout_problem

TASK_CHECK_ROTATION_DUE = "tasks.rotation.check_rotation_due"
TASK_SWEEP = "tasks.rotation.sweep"
SWEEP_EVERY = timedelta(seconds=60)
#: Beat also sends one check when it starts (worker.app): an interval alone restarts from zero
#: with every beat restart that loses the schedule file.
ROTATION_CHECK_EVERY = timedelta(days=1)


def check_visibility_timeout(settings: Settings) -> None:
    """Refuse to run when Redis could redeliver a chunk task while it is still running."""
    problem = visibility_timeout_problem(settings)
    if problem:
        raise ConfigurationError(problem)


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_url = settings.broker_url_value()
    if not broker_url:
        raise ConfigurationError("CUSCRED_BROKER_URL must be set to run the worker or beat")
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout_s},
        # Status lives in SQL tables; task results are small count dicts, kept nowhere.
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "task_annotations": {
            TASK_CHUNK: {
                "time_limit": settings.chunk_time_limit_s,
                "soft_time_limit": settings.chunk_soft_time_limit_s,
            },
        },
        "beat_schedule": {
            "kek-rotation-due": {
                "task": TASK_CHECK_ROTATION_DUE,
                "schedule": ROTATION_CHECK_EVERY,
            },
            "sweep-expired-chunks": {
                "task": TASK_SWEEP,
                "schedule": SWEEP_EVERY,
            },
        },
    }


__all__ = [
    "QUEUE", "TASK_CHECK_ROTATION_DUE", "TASK_SWEEP", "celery_config", "check_visibility_timeout",
]
