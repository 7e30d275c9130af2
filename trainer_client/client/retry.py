"""When and how long to wait before trying an HTTP request again.

One policy object for every caller (``push-baselines`` and the reward client, which is also
what ``push-baselines`` uploads through), so the backoff rules live in one place: exponential
backoff with full jitter, kept above a server's ``Retry-After``. Every request the client sends
may be repeated safely (scoring reads, a replace stores the same thing again, and an append
carries upload ids the service applies once), so a retryable status or any transport failure
is retried, whether or not the first try may have taken effect.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# 429 overloaded, 503 not ready, 504 timed out: worth another try. 507 store_full (Redis out
# of memory) is not: it lasts until someone frees memory.
DEFAULT_RETRY_STATUSES = frozenset({429, 503, 504})

# Past 2**64 the backoff is far above any sane cap; clamping keeps the float finite.
_MAX_EXPONENT = 64


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry a request.

    Attributes:
        retries: tries after the first one (0 disables retrying).
        base_s: the backoff cap of the first retry; it doubles with every further retry.
        max_s: the backoff cap never grows past this.
        retry_statuses: HTTP statuses worth another try.
        max_retry_after_s: a server's ``Retry-After`` is honoured up to this many seconds, so
            a misconfigured proxy cannot park the client for hours.
        replica_cooldown_s: with several replicas, one that refused a connection or answered
            503 is skipped this long before it is tried again (0: never skipped).
    """

    retries: int = 8
    base_s: float = 0.5
    max_s: float = 30.0
    retry_statuses: frozenset[int] = field(default=DEFAULT_RETRY_STATUSES)
    max_retry_after_s: float = 300.0
    replica_cooldown_s: float = 5.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if not (self.base_s > 0 and math.isfinite(self.base_s)):
            raise ValueError(f"base_s must be a positive number, got {self.base_s}")
        if not (self.max_s >= self.base_s and math.isfinite(self.max_s)):
            raise ValueError(f"max_s must be >= base_s and finite, got {self.max_s}")
        if not self.max_retry_after_s >= 0:
            raise ValueError(f"max_retry_after_s must be >= 0, got {self.max_retry_after_s}")
        if not (self.replica_cooldown_s >= 0 and math.isfinite(self.replica_cooldown_s)):
            raise ValueError(
                f"replica_cooldown_s must be >= 0 and finite, got {self.replica_cooldown_s}"
            )

    def backoff_cap_s(self, retry: int) -> float:
        """The upper bound of the jittered wait before retry number ``retry`` (0-based)."""
        if retry < 0:
            raise ValueError(f"retry must be >= 0, got {retry}")
        return min(self.max_s, self.base_s * 2.0 ** min(retry, _MAX_EXPONENT))

    def delay_s(
        self,
        retry: int,
        retry_after_s: float | None = None,
        *,
        rng: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number ``retry`` (0-based).

        Full jitter: uniform in ``[0, backoff_cap_s(retry)]``, so that many clients refused at
        the same moment do not come back at the same moment. A server's ``Retry-After`` (up to
        ``max_retry_after_s``) moves that whole range up, to ``[floor, floor + cap]``: coming
        back earlier would only be refused again, and waiting exactly the floor would bring
        every refused client back at once (a wave). So the wait is never below the floor nor
        above ``max_retry_after_s + max_s``.

        Args:
            retry: how many retries came before this one.
            retry_after_s: the server's ``Retry-After`` in seconds, if it sent one.
            rng: a source of floats in ``[0, 1)``; injectable for tests.
        """
        jittered = rng() * self.backoff_cap_s(retry)
        if retry_after_s is None or not math.isfinite(retry_after_s) or retry_after_s < 0:
            return jittered
        return min(retry_after_s, self.max_retry_after_s) + jittered

    def retryable_status(self, status: int) -> bool:
        """Whether an answer with this HTTP status is worth another try."""
        return status in self.retry_statuses


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The ``Retry-After`` header in seconds: delta-seconds or an HTTP date.

    ``headers`` is looked up as ``retry-after`` (``httpx.Headers`` ignores case). None when the
    header is absent or unreadable: a bad header must not turn a retryable answer into a crash.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until_http_date(value, now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _seconds_until_http_date(value: str, now: float | None) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
