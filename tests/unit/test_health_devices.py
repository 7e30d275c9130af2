"""Device threads as the API reports them: /livez and /readyz when threads died, and the
batcher's failures as envelopes (503 with Retry-After when another replica can serve, a 500
naming nothing internal when the model failed on an item)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from service.scoring.batcher import (
    Batcher,
    DeviceHealth,
    DeviceThreadsDead,
    ServiceStopping,
)
from service.scoring.types import Encoded, RewardInput, Score
from service.settings import Truncation
from tests.unit.fake_engine import FakeEngine, fake_reward, serve
from tests.unit.test_api import GOOD, assert_envelope, make_app, post, run

DEAD = "device threads died"


class NullObserver:
    def queue_changed(self, items: int, tokens: int) -> None: ...

    def batch_done(self, **kwargs: Any) -> None: ...

    def items_waited(self, seconds: Sequence[float]) -> None: ...

    def items_dropped(self, reason: str, count: int) -> None: ...


class BatcherEngine(FakeEngine):
    """The fake engine scoring through a real ``Batcher`` and a given forward pass."""

    def __init__(
        self,
        forward: Callable[[Sequence[Encoded]], list[float]],
        worker_init: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.batcher = Batcher(
            forward=forward,
            max_batch_tokens=4096,
            max_queue_tokens=100_000,
            batch_wait_s=0.001,
            observer=NullObserver(),
            worker_init=worker_init,
        )

    @property
    def device_health(self) -> DeviceHealth:
        return self.batcher.device_health

    async def astart(self, *, full_warm_up: bool = False) -> None:
        self.batcher.start()
        await super().astart(full_warm_up=full_warm_up)

    async def astop(self) -> None:
        await self.batcher.stop()
        await super().astop()

    async def score(self, items: Sequence[RewardInput], *, truncation: Truncation) -> list[Score]:
        encoded = [Encoded(input_ids=[1, 2], token_type_ids=None, truncated=False) for _ in items]
        rewards = await self.batcher.submit(encoded, 60)
        return [Score(reward=r, tokens=2, truncated=False) for r in rewards]


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
def test_no_live_device_thread_is_a_503_on_both_health_routes(path: str) -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            assert (await client.get(path)).status_code == 200
            engine.devices = DeviceHealth(started=2, alive=0, died=2)
            error = assert_envelope(await client.get(path), 503, "not_ready")
            assert "2 of 2 " + DEAD in error["message"]

    run(body())


def test_one_dead_thread_of_two_fails_liveness_and_keeps_readiness() -> None:
    """The live thread still scores (ready), but the dead one never comes back (not live)."""

    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            engine.devices = DeviceHealth(started=2, alive=1, died=1)
            error = assert_envelope(await client.get("/livez"), 503, "not_ready")
            assert "1 of 2 " + DEAD in error["message"]
            assert (await client.get("/readyz")).status_code == 200

    run(body())


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [(ServiceStopping(), "1"), (DeviceThreadsDead(1, 1), "5")],
    ids=["stopping", "threads-dead"],
)
def test_scoring_unavailable_here_is_a_503_with_retry_after(
    error: Exception, retry_after: str
) -> None:
    """The old mapping answered these 500 (BatchFailed), which clients do not retry."""

    async def body() -> None:
        engine = FakeEngine()
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            engine.fail_next_score(error)
            response = await post(client, GOOD)
            assert_envelope(response, 503, "not_ready")
            assert response.headers["retry-after"] == retry_after

    run(body())


def test_a_failed_batch_answers_500_naming_nothing_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "CUDA out of memory. Tried to allocate 2.00 GiB (/opt/crs/weights/model.bin)"

    def forward(batch: Sequence[Encoded]) -> list[float]:
        raise RuntimeError(secret)

    async def body() -> None:
        engine = BatcherEngine(forward)
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, GOOD)
            error = assert_envelope(response, 500, "internal")
            for leak in ("CUDA", "GiB", "/opt", "model.bin", "RuntimeError"):
                assert leak not in response.text
            assert "incident" in error["message"]

    run(body())
    assert secret in caplog.text


def test_device_threads_dead_at_start_make_requests_fail_at_once_and_readyz_503() -> None:
    """Every device thread dies in its set-up: /readyz says so, and a request gets a 503 at
    once (it waited for its 60 s limit before, and was answered 504)."""

    def init() -> None:
        raise RuntimeError("cannot bind cores")

    async def body() -> None:
        engine = BatcherEngine(lambda batch: [0.0] * len(batch), worker_init=init)
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, GOOD)
            error = assert_envelope(response, 503, "not_ready")
            assert DEAD in error["message"]
            error = assert_envelope(await client.get("/readyz"), 503, "not_ready")
            assert "1 of 1 " + DEAD in error["message"]
            assert (await client.get("/livez")).status_code == 503

    run(body())


def test_a_working_batcher_engine_scores() -> None:
    """The stand-in above is sound: with a working forward the request is answered."""

    async def body() -> None:
        engine = BatcherEngine(lambda batch: [fake_reward("", "four")] * len(batch))
        async with serve(make_app(engine)) as client:
            await engine.wait_settled()
            response = await post(client, GOOD)
            assert response.status_code == 200, response.text
            assert (await client.get("/livez")).json() == {"status": "alive"}

    run(body())
