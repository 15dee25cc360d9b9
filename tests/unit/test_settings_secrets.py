"""No settings object shows a secret in its repr, whatever field a later change adds."""

from __future__ import annotations

import re

import pytest
from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.executor.settings import ExecutorSettings
from services.market_listener.settings import ListenerSettings
from services.scheduler.settings import SchedulerSettings

SETTINGS = (ApiSettings, ExecutorSettings, ListenerSettings, SchedulerSettings)
# A field named like this holds a secret, or a URL that may carry a password.
SECRET_NAME = re.compile(r"secret|token|password|passwd|_key$|^key$|_url$|credential", re.I)
SENTINEL = "s3ntinel-XyZ-do-not-print"


def _secret_fields(cls: type[BaseSettings]) -> list[str]:
    return [name for name, f in cls.model_fields.items()
            if SECRET_NAME.search(name) and f.annotation in (str, str | None)]


def test_the_secret_name_pattern_finds_the_known_secrets() -> None:
    assert {"secret_key", "secret_keys_retired", "redis_url", "database_url"} <= set(_secret_fields(ExecutorSettings))
    assert "market_data_access_token" in _secret_fields(ListenerSettings)
    assert "jwt_secret" in _secret_fields(ApiSettings)


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_settings_repr_hides_every_secret(cls: type[BaseSettings]) -> None:
    names = _secret_fields(cls)
    values = {name: f"redis://u:{SENTINEL}@h:1/0" if name.endswith("_url") else SENTINEL for name in names}
    settings = cls.model_validate(values)
    assert all(SENTINEL in str(getattr(settings, n)) for n in names)  # the values were taken
    assert SENTINEL not in repr(settings)
    assert SENTINEL not in str(settings)
