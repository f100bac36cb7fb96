"""Vault / OpenBao access: a typed KV v2 adapter and the one place hvac errors are translated.

See :mod:`cuscred.vault.client` and :mod:`cuscred.vault.errors`.
"""

from cuscred.vault.client import (
    KVMetadata,
    KVSecret,
    Relogin,
    VaultKV,
    approle_relogin,
    build_vault_client,
)
from cuscred.vault.errors import translate_vault_errors

__all__ = [
    "KVMetadata",
    "KVSecret",
    "Relogin",
    "VaultKV",
    "approle_relogin",
    "build_vault_client",
    "translate_vault_errors",
]
