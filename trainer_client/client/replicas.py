"""Which replica gets the next request: round robin, skipping the ones cooling down."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence

import httpx

# Failures that say the replica itself is gone or going (refused, reset, dropped mid-answer):
# the next requests should go elsewhere for a while. A read timeout is left out: it more often
# means one heavy request than a dead server.
_REPLICA_DOWN = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)

# 503 not_ready: loading, draining or shutting down.
REPLICA_DOWN_STATUSES = frozenset({503})


def replica_down(error: httpx.TransportError) -> bool:
    """Whether a transport failure means the replica, not the request, is the problem."""
    return isinstance(error, _REPLICA_DOWN)


def base_url(url: str) -> str:
    """``url`` checked and without a trailing slash (a path prefix behind a proxy is kept).

    Raises:
        ValueError: not an absolute http(s) URL with a host.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ValueError(f"bad service URL {url!r}: {error}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"bad service URL {url!r}: expected http(s)://host[:port]")
    return url.rstrip("/")


class Replicas:
    """Base URLs taken in turn; one marked down is passed over until its cool-down ends.

    Not thread-safe: it lives on one event loop.
    """

    def __init__(
        self,
        urls: Sequence[str],
        cooldown_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("at least one service URL is needed")
        self.urls = [base_url(url) for url in urls]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"service URLs repeat: {self.urls}")
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._next = 0
        self._down_until: dict[str, float] = {}

    def pick(self, avoid: str | None = None, skip: Collection[str] = ()) -> str:
        """The next replica in turn that is not cooling down, preferring one other than
        ``avoid`` (where the request just failed) and never one in ``skip`` (those that do
        not serve the model version the request is pinned to). When all are cooling down,
        the one back soonest: a request is never refused here, only delayed by the caller's
        backoff.

        Raises:
            ValueError: ``skip`` names every replica.
        """
        now = self._clock()
        count = len(self.urls)
        turn = [self.urls[(self._next + step) % count] for step in range(count)]
        steps = [step for step in range(count) if turn[step] not in skip]
        if not steps:
            raise ValueError(f"every replica is skipped: {sorted(skip)}")

        def rank(step: int) -> tuple[bool, float, bool, int]:
            url = turn[step]
            until = self._down_until.get(url, 0.0)
            cooling = until > now
            return (cooling, until if cooling else 0.0, url == avoid, step)

        step = min(steps, key=rank)
        self._next = (self._next + step + 1) % count
        return turn[step]

    def mark_down(self, url: str) -> None:
        """Skip ``url`` for the cool-down from now."""
        if self.cooldown_s > 0:
            self._down_until[url] = self._clock() + self.cooldown_s

    def mark_up(self, url: str) -> None:
        """``url`` answered: it is back in the rotation at once."""
        self._down_until.pop(url, None)

    def other_available(self, url: str, skip: Collection[str] = ()) -> bool:
        """Whether a replica other than ``url``, and not in ``skip``, is not cooling down (so a
        retry need not wait)."""
        now = self._clock()
        return any(
            other != url and other not in skip and self._down_until.get(other, 0.0) <= now
            for other in self.urls
        )
