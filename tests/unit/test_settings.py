"""Settings from the environment: prefix, token lists, refusals."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.settings import Settings, redact_url


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


SAFE = st.text(alphabet=string.ascii_letters + string.digits + "!$%&'()*+,;=-._~", min_size=1)


@given(user=st.sampled_from(["", "default", "crs"]), password=SAFE)
def test_redis_url_password_is_redacted(user: str, password: str) -> None:
    password = f"Sekr1t{password}"  # distinctive, so that no other setting contains it
    url = f"redis://{user}:{password}@redis.internal:6379/0"
    assert redact_url(url) == "redis://***@redis.internal:6379/0"
    settings = Settings(redis_url=url)
    assert settings.for_log()["redis_url"] == "redis://***@redis.internal:6379/0"
    assert password not in str(settings.for_log())
    assert password not in repr(settings)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("rediss://token-as-user@[::1]:6380", "rediss://***@[::1]:6380"),
        (
            "unix:///run/redis.sock?password=hunter22&db=1",
            "unix:///run/redis.sock?password=***&db=1",
        ),
        ("redis://[::1", "***"),
    ],
)
def test_redact_url_keeps_everything_but_the_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("name", ["CRS_API_TOKENS", "CRS_ADMIN_TOKEN"])
def test_short_token_error_names_the_setting_not_the_value(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "zq7!xk")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert f"{name}: every token must be at least 8 characters long" in str(refused.value)
    assert "zq7" not in str(refused.value)


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_admin_token_leaves_the_admin_plane_off(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CRS_ADMIN_TOKEN", value)
    assert Settings().admin_token is None


def test_tokens_never_appear_in_the_logged_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRS_API_TOKENS", "api-token-123")
    monkeypatch.setenv("CRS_ADMIN_TOKEN", "admin-token-456")
    shown = str(Settings().for_log())
    assert "api-token-123" not in shown
    assert "admin-token-456" not in shown


def test_default_drain_outlasts_the_request_timeout() -> None:
    settings = Settings()
    assert settings.shutdown_timeout_s > settings.request_timeout_s


def test_several_named_models_keep_their_order_and_the_first_is_the_default() -> None:
    settings = Settings(models="help=/m/help, harm=/m/harm")
    assert settings.model_specs() == [("help", Path("/m/help")), ("harm", Path("/m/harm"))]
    assert Settings(model_path="/m/rm", model_name="rm").model_specs() == [("rm", Path("/m/rm"))]


@pytest.mark.parametrize(
    "models",
    ["help", "=/m/x", "help=", "he lp=/m/x", "a=/m/x,a=/m/y"],
    ids=["no-dir", "no-name", "empty-dir", "space-in-name", "twice"],
)
def test_a_bad_model_list_is_refused_naming_the_rule(models: str) -> None:
    with pytest.raises(ValidationError, match="NAME=DIR|appears twice"):
        Settings(models=models)


def test_serve_flags_take_one_directory_or_named_ones() -> None:
    from service.cli import model_flags

    assert model_flags(["/m/rm"]) == {"model_path": Path("/m/rm")}
    assert model_flags(["a=/m/a", "b=/m/b"]) == {"models": ["a=/m/a", "b=/m/b"]}
    assert model_flags([]) == {}
