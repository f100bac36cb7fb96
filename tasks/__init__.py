"""Celery tasks: thin wrappers that take ids, call one service method, and return counts."""
