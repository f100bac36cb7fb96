"""Production mode (``CUSCRED_ENV=production``): what it refuses, with a message naming the
setting and never a value."""

from __future__ import annotations

import pytest

from cuscred.config import Settings
from cuscred.errors import ConfigurationError

_VAULT = {
    "CUSCRED_ENV": "production",
    "CUSCRED_KEK_SOURCE": "vault",
    "CUSCRED_VAULT_ADDR": "https://vault.internal:8200",
    "CUSCRED_VAULT_TOKEN": "hvs.tokenvalue123456",
    "CUSCRED_DATABASE_URL": "postgresql://cuscred:dbpw7788@db/cuscred",
}


def test_a_complete_production_configuration_is_accepted() -> None:
    settings = Settings.from_env(_VAULT)
    assert not settings.is_development


@pytest.mark.parametrize(("change", "named"), [
    ({"CUSCRED_KEK_SOURCE": "local"}, "production refuses the local keyring"),
    ({"CUSCRED_VAULT_ADDR": None}, "production needs CUSCRED_VAULT_ADDR set explicitly"),
    ({"CUSCRED_VAULT_TOKEN": None}, "CUSCRED_VAULT_TOKEN is required"),
    ({"CUSCRED_VAULT_AUTH": "approle"}, "CUSCRED_VAULT_ROLE_ID and CUSCRED_VAULT_SECRET_ID"),
])
def test_production_refuses(change: dict[str, str | None], named: str) -> None:
    env = {k: v for k, v in {**_VAULT, **change}.items() if v is not None}
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    message = str(info.value)
    assert named in message
    assert "tokenvalue123456" not in message and "dbpw7788" not in message
