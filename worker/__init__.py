"""The rotation worker: ``celery -A worker worker``, ``celery -A worker beat``,
``celery -A worker flower --basic-auth=USER:PASS``."""

from worker.app import app

__all__ = ["app"]
