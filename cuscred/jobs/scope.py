"""Which credentials a job still has to move: the one definition of "stale".

A row is stale for a job when it is in the job's scope (all tenants, or one) and either its KEK
version is not the job's target or its tenant key generation is not the tenant's active one (or
the tenant has none, which only a damaged ``tenant_keys`` table shows: such rows are failed by
the chunk, never left out of the counts).
Rows a job already recorded as failed are left out, so a sweep-up pass does not count them
twice. Everything is computed from the indexed header-version columns: nothing is decrypted.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select

from cuscred.db.models import CREDENTIALS, ROTATION_FAILURES, TENANT_KEYS, KeyState

_C = CREDENTIALS
_T = TENANT_KEYS
_F = ROTATION_FAILURES

#: Columns a chunk reads for each stale row.
ROW_COLUMNS = (
    _C.c.pk, _C.c.credential_id, _C.c.tenant_id, _C.c.ciphertext, _C.c.kek_version,
    _C.c.key_generation, _C.c.row_version, _C.c.context_json,
    _T.c.generation.label("active_generation"),
)


def _stale(job_id: int, target_kek: int, tenant_id: str | None) -> Any:
    clauses = [
        # A tenant with no active generation (a damaged tenant_keys row) has NULL here: its
        # rows are stale too, so a chunk records them as failed instead of never seeing them.
        or_(_C.c.kek_version != target_kek, _C.c.key_generation != _T.c.generation,
            _T.c.generation.is_(None)),
        ~exists().where(_F.c.job_id == job_id, _F.c.credential_pk == _C.c.pk),
    ]
    if tenant_id is not None:
        clauses.append(_C.c.tenant_id == tenant_id)
    return and_(*clauses)


def _joined(query: Select[Any]) -> Select[Any]:
    return query.outerjoin(
        _T, and_(_T.c.tenant_id == _C.c.tenant_id, _T.c.state == KeyState.ACTIVE)
    )


def stale_rows(
    job_id: int, target_kek: int, tenant_id: str | None, pk_lo: int, pk_hi: int
) -> Select[Any]:
    """The stale rows of one chunk's range, in primary-key order."""
    query = _joined(select(*ROW_COLUMNS)).where(
        _C.c.pk.between(pk_lo, pk_hi), _stale(job_id, target_kek, tenant_id)
    )
    return query.order_by(_C.c.pk)


def count_stale(
    job_id: int, target_kek: int, tenant_id: str | None,
    pk_lo: int | None = None, pk_hi: int | None = None,
) -> Select[Any]:
    query = _joined(select(func.count())).where(_stale(job_id, target_kek, tenant_id))
    if pk_lo is not None and pk_hi is not None:
        query = query.where(_C.c.pk.between(pk_lo, pk_hi))
    return query


def scope_census(tenant_id: str | None) -> Select[Any]:
    """Rows in a job's scope per (KEK version, tenant key generation), from the indexed
    header-version columns: the census a job records when it finishes."""
    query = select(_C.c.kek_version, _C.c.key_generation, func.count()).group_by(
        _C.c.kek_version, _C.c.key_generation).order_by(_C.c.kek_version, _C.c.key_generation)
    return query if tenant_id is None else query.where(_C.c.tenant_id == tenant_id)


def chunk_boundaries(
    job_id: int, target_kek: int, tenant_id: str | None, chunk_size: int
) -> Select[Any]:
    """Primary keys that start a chunk (every ``chunk_size``-th stale row) and the last one.

    One pass over the stale rows, numbered by a window function; only the boundary keys come
    back, so planning a million rows moves ~500 numbers, not a million.
    """
    numbered = _joined(
        select(
            _C.c.pk.label("pk"),
            func.row_number().over(order_by=_C.c.pk).label("n"),
            func.count().over().label("total"),
        )
    ).where(_stale(job_id, target_kek, tenant_id)).subquery()
    return (
        select(numbered.c.pk, numbered.c.n, numbered.c.total)
        .where(or_((numbered.c.n - 1) % chunk_size == 0, numbered.c.n == numbered.c.total))
        .order_by(numbered.c.pk)
    )


__all__ = ["ROW_COLUMNS", "chunk_boundaries", "count_stale", "stale_rows"]
