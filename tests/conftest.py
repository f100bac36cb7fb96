"""Shared fixtures: real databases (SQLite and PostgreSQL), real OpenBao.

Every storage test takes the ``db_url`` fixture, which is parametrised over both backends, so it
runs twice. PostgreSQL tests use a throw-away database created in the local cluster (trust auth)
and dropped at the end of the session.
"""

from __future__ import annotations

pytest_plugins = ["tests.vault_fixtures"]
