"""Health checks: what ``cuscred doctor`` reports, and what a process checks before it serves.

Each check returns a :class:`Check` and never raises for the problem it looks for; its
``detail`` names settings, versions, counts and error codes, never a value (no URL, token,
path or secret). :func:`preflight` is the start-up subset that must stop a process: a KEK
version that rows still use and that cannot be loaded would make every read of those rows fail
at 3 a.m. instead of once, at start-up, with one line naming the version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from cuscred.config import Settings
from cuscred.db.migrate import current_and_head
from cuscred.db.models import KeyState
from cuscred.errors import ConfigurationError, CuscredError
from cuscred.services.audit_verify import verify_chain
from cuscred.services.key_history import state_mismatches

if TYPE_CHECKING:
    from cuscred.factory import Runtime

log = logging.getLogger("cuscred.health")


@dataclass(frozen=True, slots=True)
class Check:
    """One check's verdict. ``detail`` is safe to print and to log."""

    name: str
    ok: bool
    detail: str


def visibility_timeout_problem(settings: Settings) -> str | None:
    """Redis redelivers an unacknowledged task after its visibility timeout; a chunk task is
    unacknowledged (late ack) for as long as it runs, up to its hard time limit."""
    if settings.broker_visibility_timeout_s > settings.chunk_time_limit_s:
        return None
    return (
        f"CUSCRED_BROKER_VISIBILITY_TIMEOUT_S ({settings.broker_visibility_timeout_s}) must "
        f"exceed CUSCRED_CHUNK_TIME_LIMIT_S ({settings.chunk_time_limit_s}), or Redis would "
        "deliver a running chunk task a second time"
    )


def kek_version_problems(runtime: Runtime) -> list[str]:
    """Why KEK versions that rows use (or the active one) cannot be used; [] if all load.

    A database without the schema yet has nothing to check. Raises
    :class:`~cuscred.errors.VaultUnavailableError` (retryable) and database errors: an outage
    is not a verdict on the keys.
    """
    keys = runtime.keys
    with runtime.engine.connect() as conn:
        if not inspect(conn).has_table("kek_versions"):
            return []
        states = keys.kek_states(conn, fresh=True)
        census = keys.census(conn)
    problems = []
    for version, count in sorted(census.items()):
        if version not in states:
            problems.append(f"{count} credential(s) on KEK version {version}, which the "
                            "database does not record")
        elif states[version] == KeyState.RETIRED:
            problems.append(f"{count} credential(s) on retired KEK version {version}")
    needed = {v for v, n in census.items() if n and v in states}
    needed |= {v for v, s in states.items() if s == KeyState.ACTIVE}
    for version in sorted(needed):
        try:
            keys.kek(version)
        except CuscredError as exc:
            if exc.retryable:
                raise
            what = f"{census.get(version, 0)} credential(s)"
            if states.get(version) == KeyState.ACTIVE:
                what += " and every new write (it is the active version)"
            problems.append(f"KEK version {version} cannot be loaded from the "
                            f"{keys.source.kind} source ({exc.code}); {what} depend on it")
    return problems


def preflight(runtime: Runtime) -> None:
    """Fail fast, with one line, when a KEK version rows still use cannot be loaded.

    Raises :class:`ConfigurationError`. An outage (Vault or the database unreachable) is not a
    verdict on the keys: it is logged and the process starts; its work retries with backoff
    until the service is back, and ``cuscred doctor`` reports the check as failed meanwhile.
    """
    try:
        problems = kek_version_problems(runtime)
    except CuscredError as exc:
        if not exc.retryable:
            raise
        log.warning("KEK versions not checked at start-up: %s (will retry on use)", exc.code)
        return
    except SQLAlchemyError as exc:
        log.warning("KEK versions not checked at start-up: database %s (will retry on use)",
                    type(exc).__name__)
        return
    if problems:
        raise ConfigurationError("; ".join(problems))


# --- the doctor's checks ---------------------------------------------------------------------


def check_schema(runtime: Runtime) -> Check:
    try:
        current, head = current_and_head(runtime.engine)
    except SQLAlchemyError as exc:
        return Check("schema", False, f"database unreachable ({type(exc).__name__})")
    if current != head:
        return Check("schema", False, f"database at revision {current or 'none'}, migrations "
                                      f"at {head}: run `cuscred db upgrade`")
    return Check("schema", True, f"at head ({head})")


def check_kek_versions(runtime: Runtime) -> Check:
    try:
        problems = kek_version_problems(runtime)
    except CuscredError as exc:
        return Check("kek_versions", False, f"could not check: {exc.code}")
    except SQLAlchemyError as exc:
        return Check("kek_versions", False, f"could not check: database {type(exc).__name__}")
    if problems:
        return Check("kek_versions", False, "; ".join(problems))
    with runtime.engine.connect() as conn:
        census = runtime.keys.census(conn) if inspect(conn).has_table("credentials") else {}
    spread = ", ".join(f"v{v}: {n}" for v, n in sorted(census.items())) or "no credentials"
    return Check("kek_versions", True, f"every version in use loads ({spread})")


def check_audit_chain(runtime: Runtime) -> Check:
    try:
        with runtime.engine.connect() as conn:
            if not inspect(conn).has_table("audit_events"):
                return Check("audit_chain", False, "no schema yet: run `cuscred db upgrade`")
            report = verify_chain(conn, runtime.audit.keys)
    except CuscredError as exc:
        return Check("audit_chain", False, f"could not verify: {exc.code}")
    except SQLAlchemyError as exc:
        return Check("audit_chain", False, f"could not verify: database {type(exc).__name__}")
    if not report.ok:
        return Check("audit_chain", False, f"{report.problem} at row {report.problem_seq}"
                                           + (f" ({report.detail})" if report.detail else ""))
    return Check("audit_chain", True, f"{report.rows_checked} rows verify; head "
                                      f"{report.head_seq}:{report.head_mac}")


def check_broker(settings: Settings) -> Check:
    url = settings.broker_url_value()
    if url is None:
        return Check("broker", True, "none configured: jobs run their chunks in-process")
    problem = visibility_timeout_problem(settings)
    if problem:
        return Check("broker", False, problem)
    import redis  # only here: processes without a broker never load it

    try:
        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        # The URL may carry a password: name the error class only.
        return Check("broker", False, f"broker unreachable ({type(exc).__name__})")
    return Check("broker", True, f"reachable; visibility timeout "
                                 f"{settings.broker_visibility_timeout_s}s > chunk time limit "
                                 f"{settings.chunk_time_limit_s}s")


def check_vault(runtime: Runtime) -> Check:
    if runtime.vault_kv is None:
        return Check("vault", True, "not configured (local keyring)")
    try:
        status = runtime.vault_kv.server_status()
    except CuscredError as exc:
        return Check("vault", False, f"unreachable ({exc.code})")
    if status.sealed:
        return Check("vault", False, f"sealed (version {status.version})")
    if status.storage_type == "inmem" and not runtime.settings.is_development:
        return Check("vault", False, "a dev-mode server (in-memory storage): its KEK is gone "
                                     "when it stops; production needs persistent storage")
    return Check("vault", True, f"unsealed, storage {status.storage_type or '?'}, "
                                f"version {status.version}")


def check_key_states(runtime: Runtime) -> Check:
    """The KEK version states against the history the audit trail records for them."""
    try:
        with runtime.engine.connect() as conn:
            if not inspect(conn).has_table("kek_versions"):
                return Check("key_states", False, "no schema yet: run `cuscred db upgrade`")
            mismatches = state_mismatches(conn)
    except SQLAlchemyError as exc:
        return Check("key_states", False, f"could not check: database {type(exc).__name__}")
    if mismatches:
        return Check("key_states", False, "changed outside cuscred: " + "; ".join(mismatches))
    return Check("key_states", True, "every KEK version's state matches the audit trail")


def run_checks(runtime: Runtime) -> list[Check]:
    """Every check, in the order an operator would fix them."""
    settings = runtime.settings
    return [
        Check("settings", True, f"{settings.env.value}, KEK source "
                                f"{settings.kek_source.value}"),
        check_schema(runtime),
        check_vault(runtime),
        check_kek_versions(runtime),
        check_audit_chain(runtime),
        check_key_states(runtime),
        check_broker(settings),
    ]


__all__ = [
    "Check",
    "check_audit_chain",
    "check_broker",
    "check_kek_versions",
    "check_key_states",
    "check_schema",
    "check_vault",
    "kek_version_problems",
    "preflight",
    "run_checks",
    "visibility_timeout_problem",
]
