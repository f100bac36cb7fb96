"""Run the Alembic migrations from code (``cuscred db upgrade``, tests, the worker's checks).

Alembic is imported inside the functions: it costs ~130 ms at start-up, and most ``cuscred``
commands (and every library user's import) never touch a migration.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine

if TYPE_CHECKING:
    from alembic.config import Config

_ROOT = Path(__file__).resolve().parents[2]


def alembic_config() -> Config:
    """The project's Alembic configuration (``alembic.ini`` next to ``migrations/``)."""
    from alembic.config import Config

    cfg = Config(str(_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(_ROOT / "migrations"))
    return cfg


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration on ``engine``'s database."""
    from alembic import command

    cfg = alembic_config()
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def current_and_head(engine: Engine) -> tuple[str | None, str | None]:
    """(revision the database is at, newest revision in ``migrations/``)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


__all__ = ["alembic_config", "current_and_head", "upgrade_to_head"]
