"""Settings from the environment: prefix, token lists, refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRS_MAX_ITEMS_PER_REQUEST", "12")
    monkeypatch.setenv("CRS_API_TOKENS", " old-token-1 , new-token-2 ,")
    settings = Settings()
    assert settings.max_items_per_request == 12
    assert [t.get_secret_value() for t in settings.api_tokens] == ["old-token-1", "new-token-2"]
    assert "old-token-1" not in repr(settings)


@pytest.mark.parametrize(
    "env",
    [
        {"CRS_API_TOKENS": "short"},
        {"CRS_ADMIN_TOKEN": "short"},
        {"CRS_MAX_ITEMS_PER_REQUEST": "0"},
        {"CRS_TRUNCATION": "right"},
        {"CRS_INPUT_FORMAT": "prose"},
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()
