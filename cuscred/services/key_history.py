"""The KEK version states the audit trail says there should be, against those the table holds.

``kek_versions`` is what every process reads to choose the key it encrypts with, and it carries
no MAC of its own: someone with write access to the database could make a retired version
active again (say, the one a rotation was for because it leaked) and new credentials would be
sealed under it. Every state change also writes a ``kek_state`` audit event (``v3:promote``,
``v1:retire``, …), and those rows are HMAC-chained under the KEK, so they cannot be forged or
removed unnoticed. Replaying them gives the states the table must show; ``cuscred doctor``
reports every version where the two differ (the chain itself is verified by its own check).
"""

from __future__ import annotations

import re

from sqlalchemy import Connection, select

from cuscred.db.models import AUDIT_EVENTS, KEK_VERSIONS, KeyState

_A = AUDIT_EVENTS
_REASON = re.compile(r"v(\d+):(register|adopt|bootstrap|promote|demote|retire|unretire)")


def replay_states(reasons: list[str], recorded: set[int]) -> dict[int, str]:
    """The states after applying the ``kek_state`` reasons in order.

    The first version can also be adopted without an event (the first write of a fresh
    installation takes the keyring's newest version as active): a lowest recorded version that
    no event names starts out active.
    """
    named = {int(m.group(1)) for r in reasons if (m := _REASON.fullmatch(r))}
    states: dict[int, str] = {}
    if recorded and min(recorded) not in named:
        states[min(recorded)] = KeyState.ACTIVE
    for reason in reasons:
        match = _REASON.fullmatch(reason)
        if match is None:
            continue
        version, action = int(match.group(1)), match.group(2)
        if action in ("register", "adopt", "demote", "unretire"):
            states[version] = KeyState.DECRYPT_ONLY
        elif action == "retire":
            states[version] = KeyState.RETIRED
        else:  # bootstrap, promote: exactly one active version
            states = {v: (KeyState.DECRYPT_ONLY if s == KeyState.ACTIVE else s)
                      for v, s in states.items()}
            states[version] = KeyState.ACTIVE
    return states


def state_mismatches(conn: Connection) -> list[str]:
    """One line per KEK version whose recorded state is not what the audit trail implies."""
    table = {int(v): str(s) for v, s in conn.execute(
        select(KEK_VERSIONS.c.version, KEK_VERSIONS.c.state))}
    reasons = list(conn.execute(
        select(_A.c.reason).where(_A.c.action == "kek_state", _A.c.outcome == "success",
                                  _A.c.reason.is_not(None)).order_by(_A.c.seq)).scalars())
    expected = replay_states(reasons, set(table))
    return [
        f"v{v}: the table says {table.get(v, 'nothing')}, the audit trail "
        f"{expected.get(v, 'nothing')}"
        for v in sorted(set(table) | set(expected)) if table.get(v) != expected.get(v)
    ]


__all__ = ["replay_states", "state_mismatches"]
