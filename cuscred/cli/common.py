"""What every CLI command shares: settings, the runtime, secret input, errors and exit codes.

Exit codes (also in the README) let a shell script tell failures apart:

====  ==========================================================
0     success
1     unexpected internal error (a bug: please report it)
2     usage error (wrong options; printed by the option parser)
3     not found (no such credential for this tenant or job, Vault path/version gone)
4     denied (outside the tenant's scope, Vault permission, env:// disabled)
5     the stored value failed to decrypt/authenticate
6     invalid input (secret, tenant id, context, reference); nothing changed
7     a key-state change was refused (e.g. retiring a version rows still use)
8     verification failed (audit chain broken, credentials that do not decrypt)
9     a job did not complete cleanly (completed_with_errors, failed, cancelled, unfinished)
69    a service is unavailable (Vault, database); safe to retry later
78    configuration error (missing keyring, bad CUSCRED_* setting)
====  ==========================================================
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError

from cuscred import errors
from cuscred.config import Settings
from cuscred.factory import Runtime, build_runtime
from cuscred.logging_redaction import log_warnings_to_stderr

EXIT_INTERNAL = 1
EXIT_NOT_FOUND = 3
EXIT_DENIED = 4
EXIT_DECRYPT = 5
EXIT_INVALID = 6
EXIT_KEY_STATE = 7
EXIT_VERIFY = 8
EXIT_JOB = 9
EXIT_DECLINED = 10
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78

# Checked in order: the first matching class decides the exit code.
_EXIT_CODES: tuple[tuple[type[errors.CuscredError], int], ...] = (
    (errors.ConfigurationError, EXIT_CONFIG),
    (errors.DecryptionError, EXIT_DECRYPT),
    (errors.ScopeError, EXIT_DENIED),
    (errors.PermissionDeniedError, EXIT_DENIED),
    (errors.EnvReferenceDisabledError, EXIT_DENIED),
    (errors.CredentialNotFoundError, EXIT_NOT_FOUND),
    (errors.FieldMissingError, EXIT_NOT_FOUND),
    (errors.InvalidInputError, EXIT_INVALID),
    (errors.CuscredTypeError, EXIT_INVALID),
    (errors.KeyStateError, EXIT_KEY_STATE),
    (errors.KekUnavailableError, EXIT_CONFIG),
)

# Wide when piped, so tables stay one row per line for grep and awk.
err_console = Console(stderr=True, highlight=False, soft_wrap=True,
                      width=None if sys.stderr.isatty() else 200)
out_console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def exit_code_for(exc: errors.CuscredError) -> int:
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_UNAVAILABLE if exc.retryable else EXIT_INTERNAL


@dataclass
class CliState:
    """Per-invocation state: settings are read once, the runtime built on first use."""

    actor: str | None = None
    #: Build the runtime without the production start-up check (``doctor`` reports instead).
    preflight: bool | None = None
    _settings: Settings | None = None
    _runtime: Runtime | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env(os.environ)
        return self._settings

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = build_runtime(self.settings, preflight=self.preflight)
        return self._runtime

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.engine.dispose()


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_object(CliState)
    assert obj is not None, "the root callback creates the state"
    return obj


def fail(message: str, code: int, hint: str | None = None) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", markup=True)
    if hint:
        err_console.print(f"hint: {hint}")
    raise typer.Exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """Turn library errors into one line on stderr and a documented exit code."""
    try:
        yield
    except errors.CuscredError as exc:
        hint = "retry later" if exc.retryable else None
        fail(escape(str(exc)) or type(exc).__name__, exit_code_for(exc), hint)
    except SQLAlchemyError:
        # The library maps its own database errors; this catches reads the CLI makes itself.
        fail("database error (unreachable, or the schema is not migrated: `cuscred db "
             "upgrade`)", EXIT_UNAVAILABLE, "retry later")


def read_secret(what: str = "secret") -> str:
    """Read a secret from stdin (piped) or a hidden, confirmed prompt (terminal). Never argv.

    Piped input loses exactly one trailing line terminator (what ``echo`` adds); anything else,
    surrounding spaces included, reaches the validator unchanged and is refused unless
    ``--strip`` was given, so a key that would fail at the provider is never stored silently.
    """
    if sys.stdin.isatty():
        value: str = typer.prompt(what.capitalize(), hide_input=True, confirmation_prompt=True)
        return value
    data = sys.stdin.read()
    if data.endswith("\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith("\n") else data


def parse_context(pairs: list[str] | None) -> dict[str, str] | None:
    """``--context key=value`` options into a mapping (validated by the library)."""
    if not pairs:
        return None
    out: dict[str, str] = {}
    for number, pair in enumerate(pairs, 1):
        key, sep, value = pair.partition("=")
        if not sep:
            fail(f"--context option {number} is not key=value", EXIT_INVALID)
        if key in out:  # a silent last-one-wins would bind the ciphertext to a surprise
            fail(f"--context option {number} repeats a key given before", EXIT_INVALID)
        out[key] = value
    return out


def confirm_or_stop(question: str) -> None:
    """Ask ``question``; unless the answer is yes, stop with :data:`EXIT_DECLINED` (nothing
    changed). No answer at all (stdin closed) is a no."""
    try:
        confirmed = typer.confirm(question)
    except (typer.Abort, EOFError, RuntimeError):  # end of input, or stdin closed (<&-)
        confirmed = False
    if not confirmed:
        fail("not confirmed; nothing changed (--yes skips the question)", EXIT_DECLINED)


def print_json(data: Any) -> None:
    import json

    out_console.print_json(json.dumps(data, default=str))


def quiet_logging() -> None:
    """Warnings and errors to stderr, through the redaction filter (a second line of defence:
    nothing of ours logs a secret, but a third-party library might)."""
    log_warnings_to_stderr()


__all__ = [
    "EXIT_CONFIG",
    "EXIT_DECLINED",
    "EXIT_DECRYPT",
    "EXIT_DENIED",
    "EXIT_INTERNAL",
    "EXIT_INVALID",
    "EXIT_JOB",
    "EXIT_KEY_STATE",
    "EXIT_NOT_FOUND",
    "EXIT_UNAVAILABLE",
    "EXIT_VERIFY",
    "CliState",
    "err_console",
    "exit_code_for",
    "fail",
    "handled",
    "out_console",
    "parse_context",
    "print_json",
    "read_secret",
    "state",
]
