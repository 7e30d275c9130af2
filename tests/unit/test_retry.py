"""The retry policy: backoff bounds, full jitter (also above a Retry-After), and which
statuses are retried."""

from __future__ import annotations

import email.utils
import random
import statistics

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from trainer_client.client.retry import RetryPolicy, parse_retry_after

policies = st.builds(
    lambda base, factor, retries: RetryPolicy(retries=retries, base_s=base, max_s=base * factor),
    st.floats(min_value=1e-3, max_value=10.0),
    st.floats(min_value=1.0, max_value=1000.0),
    st.integers(min_value=0, max_value=20),
)
retries = st.integers(min_value=0, max_value=10_000)
unit = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(policies, retries, unit)
def test_delay_is_within_the_capped_exponential_backoff(
    policy: RetryPolicy, retry: int, draw: float
) -> None:
    delay = policy.delay_s(retry, rng=lambda: draw)
    cap = policy.backoff_cap_s(retry)
    assert 0.0 <= delay <= cap <= policy.max_s
    # 2**retry as a float overflows past 1023; max_s <= 1000 * base_s is reached long before.
    expected = min(policy.max_s, policy.base_s * 2**retry) if retry < 1000 else policy.max_s
    assert cap == pytest.approx(expected)


@given(policies, retries, unit)
def test_jitter_is_uniform_over_the_whole_range(
    policy: RetryPolicy, retry: int, draw: float
) -> None:
    # Full jitter: the random draw maps linearly onto [0, cap], so waits spread over all of it.
    assert policy.delay_s(retry, rng=lambda: draw) == pytest.approx(
        draw * policy.backoff_cap_s(retry)
    )


@given(policies, retries, unit, st.floats(min_value=0.0, max_value=300.0))
def test_retry_after_is_a_floor_under_the_jitter(
    policy: RetryPolicy, retry: int, draw: float, retry_after: float
) -> None:
    delay = policy.delay_s(retry, retry_after, rng=lambda: draw)
    assert delay >= retry_after
    assert delay == retry_after + draw * policy.backoff_cap_s(retry)


@given(policies, retries, st.floats(min_value=300.0, allow_infinity=False), unit)
def test_retry_after_is_capped(
    policy: RetryPolicy, retry: int, retry_after: float, draw: float
) -> None:
    delay = policy.delay_s(retry, retry_after, rng=lambda: draw)
    assert policy.max_retry_after_s <= delay <= policy.max_retry_after_s + policy.max_s


# The production defaults and the measured case: every client told "Retry-After: 1" at its
# first retry came back after exactly 1.00 s (a wave).
@example(policy=RetryPolicy(), retry=0, retry_after=1.0, seed=0)
@given(
    policies,
    st.integers(min_value=0, max_value=12),
    st.floats(min_value=0.0, max_value=300.0),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_many_waits_after_one_retry_after_are_spread_above_it(
    policy: RetryPolicy, retry: int, retry_after: float, seed: int
) -> None:
    draws = random.Random(seed).random
    delays = [policy.delay_s(retry, retry_after, rng=draws) for _ in range(1000)]
    cap = policy.backoff_cap_s(retry)
    assert all(retry_after <= delay <= retry_after + cap for delay in delays)
    assert max(delays) <= policy.max_retry_after_s + policy.max_s
    # Uniform over [floor, floor + cap] has a standard deviation of cap / sqrt(12) = 0.29 cap;
    # 1000 draws land far above 0.2 cap (a constant wait would give 0).
    assert statistics.pstdev(delays) > 0.2 * cap


@given(policies, retries, st.floats(allow_nan=True).filter(lambda x: not x >= 0))
def test_unusable_retry_after_falls_back_to_backoff(
    policy: RetryPolicy, retry: int, retry_after: float
) -> None:
    assert policy.delay_s(retry, retry_after, rng=lambda: 0.5) == 0.5 * policy.backoff_cap_s(retry)


def test_the_first_retries_double() -> None:
    policy = RetryPolicy(retries=5, base_s=0.5, max_s=3.0)
    assert [policy.backoff_cap_s(r) for r in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_default_random_jitter_stays_in_range() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=8.0)
    delays = [policy.delay_s(2) for _ in range(200)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert len(set(delays)) > 100  # actually random, not a constant


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retries": -1},
        {"base_s": 0.0},
        {"base_s": float("inf")},
        {"base_s": 2.0, "max_s": 1.0},
        {"max_retry_after_s": -1.0},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (429, True),
        (503, True),
        # Retried for appends too: their upload ids make a second try a no-op.
        (504, True),
        (500, False),
        (422, False),
        (401, False),
        # store_full: Redis is out of memory, which a retry does not change.
        (507, False),
    ],
)
def test_retryable_statuses(status: int, retried: bool) -> None:
    assert RetryPolicy().retryable_status(status) is retried


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), ("-1", None), ("soon", None), ("nan", None)],
)
def test_retry_after_seconds(value: str, seconds: float | None) -> None:
    assert parse_retry_after(httpx.Headers({"Retry-After": value})) == seconds


def test_retry_after_http_date_and_absence() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": date}), now=now) == pytest.approx(7.0)
    past = email.utils.formatdate(now - 60, usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": past}), now=now) == 0.0
    assert parse_retry_after(httpx.Headers({})) is None
