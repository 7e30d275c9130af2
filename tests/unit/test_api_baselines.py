"""The baseline API and contrastive results, in process, with the fake engine and the in-process
store: the fake's rewards (a tenth of the response length) make every expected value easy to
compute independently, with numpy."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from service.baselines.memory import MemoryBaselineStore
from service.baselines.store import BaselineWrite, StoreUnavailable
from tests.unit.fake_engine import FAKE_VERSION, FakeEngine, fake_reward, serve
from tests.unit.test_api import assert_envelope, make_app, metric, run, sha256_id

RESPONSES = ["a", "bbbb", "cc", "dddddddd"]  # rewards 0.1, 0.4, 0.2, 0.8
BASE = np.array([fake_reward("P", r) for r in RESPONSES])


async def put(client: httpx.AsyncClient, items: list[dict[str, Any]], mode: str = "replace") -> Any:
    response = await client.put("/v1/baselines", json={"items": items, "mode": mode})
    assert response.status_code == 200, response.text
    return response.json()


async def score(client: httpx.AsyncClient, items: list[dict[str, Any]], **options: Any) -> Any:
    body = {"items": items, "contrastive": options}
    response = await client.post("/v1/rewards", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_put_answers_each_prompts_statistics() -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            answer = await put(client, [{"prompt": "P", "responses": RESPONSES}])
        assert answer["model"]["version"] == FAKE_VERSION
        assert (answer["stored"], answer["failed"]) == (1, 0)
        [stats] = answer["results"]
        assert stats["prompt_id"] == sha256_id("P")
        assert stats["n"] == 4
        assert stats["stored"] is True
        expected = [BASE.mean(), BASE.std(), BASE.min(), BASE.max()]
        assert [stats[k] for k in ("mean", "std", "min", "max")] == pytest.approx(expected)

    run(body())


@pytest.mark.parametrize(
    ("aggregate", "expected"),
    [
        ("mean", BASE.mean()),
        ("median", np.median(BASE)),
        ("min", BASE.min()),
        ("max", BASE.max()),
        ("quantile:0.25", np.quantile(BASE, 0.25)),
        ("quantile:0.9", np.quantile(BASE, 0.9)),
        ("quantile:1", BASE.max()),
    ],
)
@pytest.mark.parametrize("normalize", ["none", "std"])
def test_contrastive_is_reward_minus_the_aggregate(
    aggregate: str, expected: float, normalize: str
) -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            await put(client, [{"prompt": "P", "responses": RESPONSES}])
            [result] = await score(
                client,
                [{"prompt": "P", "response": "xxxxxx"}],
                aggregate=aggregate,
                normalize=normalize,
            )
        reward = fake_reward("P", "xxxxxx")
        spread = BASE.std() if normalize == "std" else 1.0
        assert result["reward"] == pytest.approx(reward)
        assert result["baseline"] == pytest.approx(expected)
        assert result["contrastive"] == pytest.approx((reward - expected) / spread)
        assert (result["baseline_n"], result["baseline_source"]) == (4, "cache")

    run(body())


def test_normalize_std_never_divides_by_less_than_the_floor() -> None:
    async def body() -> None:
        app = make_app(FakeEngine(), baseline_std_floor=0.05)
        async with serve(app) as client:
            await put(client, [{"prompt": "P", "responses": ["aa", "bb", "cc"]}])  # zero spread
            [result] = await score(client, [{"prompt": "P", "response": "aaaa"}], normalize="std")
        assert result["contrastive"] == pytest.approx((0.4 - 0.2) / 0.05)

    run(body())


def test_prompt_ids_given_or_derived_reach_the_same_baseline() -> None:
    chat = [{"role": "user", "content": "P"}]

    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            await put(
                client,
                [
                    {"prompt": "P", "prompt_id": "mine", "responses": ["a"]},
                    {"prompt": chat, "responses": ["aa", "aaaa"]},
                ],
            )
            results = await score(
                client,
                [
                    {"prompt": "anything", "prompt_id": "mine", "response": "x"},
                    {"prompt": chat, "response": "x"},
                    {"prompt": "P", "response": "x"},
                ],
            )
        assert [r["baseline_source"] for r in results] == ["cache", "cache", "missing"]
        assert [r["baseline_n"] for r in results] == [1, 2, 0]

    run(body())


@pytest.mark.parametrize(
    ("on_missing", "contrastive"), [("null", None), ("raw", pytest.approx(0.1))]
)
def test_missing_baselines_follow_on_missing(on_missing: str, contrastive: Any) -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            [result] = await score(
                client, [{"prompt": "Q", "response": "x"}], on_missing=on_missing
            )
        assert result["baseline_source"] == "missing"
        assert result["baseline"] is None
        assert result["contrastive"] == contrastive

    run(body())


def test_replace_is_idempotent_and_append_adds() -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            item = {"prompt": "P", "responses": ["a", "bb"]}
            first = await put(client, [item])
            again = await put(client, [item])
            assert first == again
            appended = await put(client, [{"prompt": "P", "responses": ["cccc"]}], mode="append")
            assert appended["results"][0]["n"] == 3
            record = (await client.get(f"/v1/baselines/{sha256_id('P')}")).json()
            assert record["responses"] == ["a", "bb", "cccc"]
            assert record["rewards"] == pytest.approx([0.1, 0.2, 0.4])
            assert record["model_version"] == FAKE_VERSION
            fresh = await put(client, [{"prompt": "R", "responses": ["d"]}], mode="append")
            assert fresh["results"][0]["n"] == 1

    run(body())


def test_get_list_and_delete() -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            await put(client, [{"prompt": p, "responses": ["a"]} for p in ("P", "Q", "R")])
            summary = (await client.get("/v1/baselines")).json()
            assert summary["store"] == "memory"
            assert (summary["prompts"], summary["with_rewards"]) == (3, 3)
            pid = sha256_id("Q")
            deleted = await client.delete(f"/v1/baselines/{pid}")
            assert deleted.json() == {"prompt_id": pid, "deleted": True}
            assert_envelope(await client.delete(f"/v1/baselines/{pid}"), 404, "not_found")
            assert_envelope(await client.get(f"/v1/baselines/{pid}"), 404, "not_found")
            assert (await client.get("/v1/baselines")).json()["prompts"] == 2

    run(body())


@pytest.mark.parametrize(
    ("items", "status", "error_type"),
    [
        pytest.param(
            [{"prompt": "P", "responses": []}], 422, "validation_error", id="no-responses"
        ),
        pytest.param([{"responses": ["a"]}], 422, "validation_error", id="no-prompt"),
        pytest.param(
            [{"prompt": "P", "responses": ["a"]}, {"prompt": "P", "responses": ["b"]}],
            422,
            "validation_error",
            id="prompt-twice",
        ),
        pytest.param([{"prompt": "P", "responses": ["a"] * 5}], 413, "payload_too_large", id="5>4"),
    ],
)
def test_bad_uploads_get_the_envelope_and_store_nothing(
    items: list[dict[str, Any]], status: int, error_type: str
) -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine(), max_items_per_request=4)) as client:
            response = await client.put("/v1/baselines", json={"items": items})
            assert_envelope(response, status, error_type)
            assert (await client.get("/v1/baselines")).json()["prompts"] == 0

    run(body())


def test_lookups_are_counted_by_source() -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            await put(client, [{"prompt": "P", "responses": ["a"]}])
            await score(
                client, [{"prompt": "P", "response": "x"}, {"prompt": "Q", "response": "y"}]
            )
            text = (await client.get("/metrics")).text
        assert metric(text, "crs_baseline_lookups_total", {"source": "cache"}) == 1
        assert metric(text, "crs_baseline_lookups_total", {"source": "missing"}) == 1

    run(body())


class FailingStore(MemoryBaselineStore):
    """A store that is down: every operation raises, and counts how often it was tried."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    async def lookup(self, *args: Any, **kwargs: Any) -> Any:
        self.tries += 1
        raise StoreUnavailable("redis lookup failed: ConnectionError: refused")

    async def write(self, *args: Any, **kwargs: Any) -> Any:
        self.tries += 1
        raise StoreUnavailable("redis write failed: ConnectionError: refused")


def with_store(app: Any, store: MemoryBaselineStore) -> Any:
    app.state.services.baselines.store = store
    return app


def test_a_store_that_is_down_gives_unavailable_and_200_then_is_left_alone() -> None:
    async def body() -> None:
        store = FailingStore()
        app = with_store(make_app(FakeEngine(), store_cooldown_s=60), store)
        async with serve(app) as client:
            first = await score(client, [{"prompt": "P", "response": "x"}], on_missing="raw")
            second = await score(client, [{"prompt": "P", "response": "x"}], on_missing="error")
            text = (await client.get("/metrics")).text
        for [result] in (first, second):
            assert result["baseline_source"] == "unavailable"
            assert result["reward"] == pytest.approx(0.1)
        assert first[0]["contrastive"] is None  # on_missing raw: an outage is not missing
        assert second[0]["contrastive"] is None  # unavailable is not missing: no 409
        assert store.tries == 1  # the second request came within the cool-down
        assert metric(text, "crs_store_skipped_total") == 1
        assert metric(text, "crs_baseline_lookups_total", {"source": "unavailable"}) == 2

    run(body())


def test_an_upload_the_store_cannot_keep_is_503_with_the_reason() -> None:
    async def body() -> None:
        app = with_store(make_app(FakeEngine()), FailingStore())
        async with serve(app) as client:
            response = await client.put(
                "/v1/baselines", json={"items": [{"prompt": "P", "responses": ["a"]}]}
            )
            error = assert_envelope(response, 503, "not_ready")
            assert "ConnectionError" in error["message"]
            assert response.headers["retry-after"] == "1"
            assert_envelope(await client.get(f"/v1/baselines/{sha256_id('P')}"), 503, "not_ready")

    run(body())


def test_a_conflicting_append_is_reported_per_prompt() -> None:
    class Racing(MemoryBaselineStore):
        """Another writer replaces prompt P between every read and write of an append."""

        races = 0

        async def lookup(self, *args: Any, **kwargs: Any) -> Any:
            found = await super().lookup(*args, **kwargs)
            self.races += 1
            other = BaselineWrite(
                prompt_id=sha256_id("P"),
                prompt="P",
                responses=["z" * self.races],  # new responses each time: a new digest
                version="v",
                rewards=[0.0],
            )
            await super().write([other])
            return found

    async def body() -> None:
        app = with_store(make_app(FakeEngine()), Racing())
        async with serve(app) as client:
            items = [{"prompt": "P", "responses": ["a"]}, {"prompt": "Q", "responses": ["b"]}]
            await put(client, items[1:])
            answer = await put(client, items, mode="append")
        assert (answer["stored"], answer["failed"]) == (1, 1)
        failed, stored = answer["results"]
        assert failed["stored"] is False
        assert "changed" in failed["error"]
        assert stored["stored"] is True
        assert stored["n"] == 2

    run(body())


@pytest.mark.parametrize("given", ["with/slash", "sha256:abc", "ünï code", "a?b#c"])
def test_any_client_prompt_id_can_be_read_and_deleted(given: str) -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            await put(client, [{"prompt": "P", "prompt_id": given, "responses": ["a"]}])
            path = f"/v1/baselines/{quote(given, safe='')}"
            record = await client.get(path)
            assert record.status_code == 200, record.text
            assert record.json()["prompt_id"] == given
            assert (await client.delete(path)).json() == {"prompt_id": given, "deleted": True}

    run(body())


def test_an_append_retried_with_its_upload_id_lands_once() -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            await put(client, [{"prompt": "P", "responses": ["a"]}])
            item = {"prompt": "P", "responses": ["bb", "ccc"], "upload_id": "job-7/P/0"}
            first = (await put(client, [item], mode="append"))["results"][0]
            again = (await put(client, [item], mode="append"))["results"][0]
            other = {**item, "upload_id": "job-7/P/1"}
            third = (await put(client, [other], mode="append"))["results"][0]
            record = (await client.get(f"/v1/baselines/{sha256_id('P')}")).json()
        assert (first["stored"], first["duplicate"], first["n"]) == (True, False, 3)
        assert (again["stored"], again["duplicate"], again["n"]) == (True, True, 3)
        assert again["mean"] == pytest.approx(first["mean"])
        assert again["upload_id"] == "job-7/P/0"
        assert (third["duplicate"], third["n"]) == (False, 5)
        assert record["responses"] == ["a", "bb", "ccc", "bb", "ccc"]

    run(body())


@pytest.mark.parametrize("upload_id", ["", "x" * 129, "é", "a\nb", 7])
def test_an_upload_id_is_1_to_128_printable_ascii_characters(upload_id: Any) -> None:
    async def body() -> None:
        async with serve(make_app(FakeEngine())) as client:
            item = {"prompt": "P", "responses": ["a"], "upload_id": upload_id}
            response = await client.put("/v1/baselines", json={"items": [item]})
            assert_envelope(response, 422, "validation_error")

    run(body())


def test_a_store_out_of_memory_is_507_store_full_without_retry_after() -> None:
    from service.baselines.store import StoreFull

    class FullStore(MemoryBaselineStore):
        async def write(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreFull("Redis is out of memory")

    async def body() -> None:
        app = with_store(make_app(FakeEngine()), FullStore())
        async with serve(app) as client:
            item = {"prompt": "P", "responses": ["a"]}
            response = await client.put("/v1/baselines", json={"items": [item]})
            error = assert_envelope(response, 507, "store_full")
            assert "out of memory" in error["message"]
            assert "retry-after" not in response.headers
            [result] = error["details"]["results"]
            assert (result["stored"], result["error_type"]) == (False, "store_full")

    run(body())


def test_a_shared_computation_survives_the_cancellation_of_its_first_asker() -> None:
    import asyncio

    from service.baselines.service import BaselineService
    from service.metrics import Metrics
    from service.settings import Settings

    async def body() -> None:
        store = MemoryBaselineStore()
        write = BaselineWrite(
            prompt_id="p", prompt="P", responses=["a", "bb"], version="old", rewards=[0.0, 0.0]
        )
        await store.write([write])
        service = BaselineService(store, Settings(), Metrics())
        gate, calls = asyncio.Event(), []

        class Scoring:
            version = FAKE_VERSION

            async def score(self, items: Any) -> list[float]:
                calls.append(items)
                await gate.wait()
                return [fake_reward(i.prompt, i.response) for i in items]

        first = asyncio.create_task(service.resolve({"p": "P"}, Scoring()))
        second = asyncio.create_task(service.resolve({"p": "P"}, Scoring()))
        while not calls:
            await asyncio.sleep(0)
        first.cancel()
        gate.set()
        baseline = (await second)["p"]
        assert first.cancelled()
        assert (baseline.source, baseline.rewards) == ("computed", [0.1, 0.2])
        assert len(calls) == 1  # computed once for both
        cached = (await store.lookup(["p"], FAKE_VERSION))["p"]
        assert cached.rewards == [0.1, 0.2]

    run(body())
