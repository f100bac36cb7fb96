"""Send job steps to the Celery workers, by task name, with ids only.

The library does not import the worker package: it only knows the task names (the contract
with ``tasks/``) and sends to the broker from the settings. Arguments are job ids and chunk
numbers, nothing else, so nothing secret can reach Redis, a result backend or Flower.
"""

from __future__ import annotations

from typing import Any

from cuscred.config import Settings

#: The one queue workers consume and clients send to.
QUEUE = "cuscred"
TASK_ADVANCE = "tasks.rotation.rotate_kek_advance"
TASK_START = "tasks.rotation.start_reencryption"
TASK_CHUNK = "tasks.rotation.reencrypt_chunk"
TASK_FINALIZE = "tasks.rotation.finalize_job"


class CeleryRunner:
    """A :class:`~cuscred.jobs.runner.JobRunner` that enqueues tasks."""

    def __init__(self, app: Any) -> None:
        self._app = app

    @classmethod
    def from_settings(cls, settings: Settings) -> CeleryRunner:
        from celery import Celery  # only processes that enqueue need Celery loaded

        app = Celery("cuscred-client", broker=settings.broker_url_value(), set_as_current=False)
        app.conf.update(
            task_serializer="json", accept_content=["json"], task_default_queue=QUEUE,
            broker_transport_options={
                "visibility_timeout": settings.broker_visibility_timeout_s},
            broker_connection_retry_on_startup=True,
        )
        return cls(app)

    def advance_rotation(self, job_id: int) -> None:
        self._app.send_task(TASK_ADVANCE, args=[job_id])

    def start(self, job_id: int) -> None:
        self._app.send_task(TASK_START, args=[job_id])

    def chunk(self, job_id: int, chunk_no: int) -> None:
        self._app.send_task(TASK_CHUNK, args=[job_id, chunk_no])

    def finalize(self, job_id: int) -> None:
        self._app.send_task(TASK_FINALIZE, args=[job_id])


__all__ = ["QUEUE", "TASK_ADVANCE", "TASK_CHUNK", "TASK_FINALIZE", "TASK_START", "CeleryRunner"]
