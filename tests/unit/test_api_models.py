"""Models and hot swap over HTTP (issue 10, DESIGN.md 4), in process with fake engines:
``GET /v1/models``, the admin plane, atomic activation with requests in flight, baselines that
follow the model, and several named models side by side.

Every fake engine of a directory scores ``fake_reward + offset`` with its own offset (OLD 0,
NEW 10, ...), so an answer tells which engine scored it. Gates hold a load or a score call where
a test needs a state to last; nothing waits for time to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from service.api.deps import Services
from service.app import create_app
from service.baselines.memory import MemoryBaselineStore
from service.baselines.store import BaselineWrite, StoredPrompt, StoreUnavailable
from service.settings import Settings
from tests.unit.fake_engine import FakeEngines, FakeModel, fake_reward, fake_version
from tests.unit.fake_engine import serve as serve_app
from tests.unit.test_api import assert_envelope, metric, run, sha256_id, until
from trainer_client.prompt_id import Prompt

ADMIN = "admin-secret-7f3a9c"
API = "api-secret-5d1e8b"
NAME = "rm"
OLD, NEW, THIRD = Path("/m/old"), Path("/m/new"), Path("/m/third")
OFFSETS = {OLD: 0.0, NEW: 10.0, THIRD: 20.0}
GOOD = {"items": [{"prompt": "P", "response": "abcd"}]}  # 0.4 plus the engine's offset
RESPONSES = ["a", "bbbb", "cc", "dddddddd"]
BASE = np.array([fake_reward("P", r) for r in RESPONSES])
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}


def version(path: Path, name: str = NAME) -> str:
    return fake_version(name, path)


def engines() -> FakeEngines:
    return FakeEngines({path: FakeModel(reward_offset=offset) for path, offset in OFFSETS.items()})


def make_app(factory: FakeEngines, **settings: Any) -> FastAPI:
    """An app serving OLD as ``rm``, with the admin plane on unless told otherwise."""
    # No linger after a swap unless a test asks: its drains end when its last request does.
    options: dict[str, Any] = {
        "model_path": OLD,
        "model_name": NAME,
        "admin_token": ADMIN,
        "drain_idle_s": 0.0,
    }
    return create_app(Settings(**{**options, **settings}), engine_factory=factory)


def services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` once its configured models are active."""
    async with serve_app(app) as client:
        await until(lambda: services_of(app).registry.ready)
        yield client


# --- requests ---------------------------------------------------------------------------------


async def load(client: httpx.AsyncClient, path: Path, **options: Any) -> dict[str, Any]:
    """``POST /admin/models``, accepted (202)."""
    response = await client.post(
        "/admin/models", json={"path": str(path), **options}, headers=ADMIN_HEADERS
    )
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def activate(client: httpx.AsyncClient, version: str, **options: Any) -> httpx.Response:
    return await client.post(
        f"/admin/models/{version}/activate", json=options or None, headers=ADMIN_HEADERS
    )


async def unload(client: httpx.AsyncClient, version: str) -> httpx.Response:
    return await client.delete(f"/admin/models/{version}", headers=ADMIN_HEADERS)


async def models(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/v1/models")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def listed(client: httpx.AsyncClient, version: str) -> dict[str, Any] | None:
    """``GET /v1/models``'s entry of ``version``, or None when it is not listed."""
    for entry in (await models(client))["models"]:
        if entry["version"] == version:
            return dict(entry)
    return None


async def until_listed(
    client: httpx.AsyncClient, version: str, state: str | None, timeout: float = 5.0
) -> dict[str, Any] | None:
    """Poll ``GET /v1/models`` until ``version`` is in ``state`` (None: no longer listed)."""
    async with asyncio.timeout(timeout):
        while True:
            entry = await listed(client, version)
            if (entry["state"] if entry else None) == state:
                return entry
            await asyncio.sleep(0.001)


async def rewards(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/rewards", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def reward_and_version(client: httpx.AsyncClient, **options: Any) -> tuple[Any, str]:
    answer = await rewards(client, {**GOOD, **options})
    return answer["results"][0]["reward"], answer["model"]["version"]


async def put_baselines(
    client: httpx.AsyncClient, prompts: list[str], **options: Any
) -> dict[str, Any]:
    items = [{"prompt": prompt, "responses": RESPONSES} for prompt in prompts]
    response = await client.put("/v1/baselines", json={"items": items, **options})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def contrastive(client: httpx.AsyncClient, prompt: str, **options: Any) -> dict[str, Any]:
    """One item of ``prompt`` answered "xxxxxx" (0.6 plus the offset), contrastive on."""
    return await rewards(
        client, {"items": [{"prompt": prompt, "response": "xxxxxx"}], "contrastive": {}, **options}
    )


async def healthy(client: httpx.AsyncClient) -> bool:
    live, ready = await client.get("/livez"), await client.get("/readyz")
    return (live.status_code, ready.status_code) == (200, 200)


# --- the admin plane and its token ------------------------------------------------------------

ADMIN_ROUTES = [
    pytest.param("POST", "/admin/models", {"path": str(NEW)}, id="load"),
    pytest.param("POST", f"/admin/models/{version(OLD)}/activate", None, id="activate"),
    pytest.param("DELETE", f"/admin/models/{version(OLD)}", None, id="unload"),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_are_absent_without_an_admin_token(
    method: str, path: str, body: dict[str, str] | None
) -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory, admin_token=None)) as client:
            response = await client.request(
                method, path, json=body, headers={"authorization": f"Bearer {ADMIN}"}
            )
            assert_envelope(response, 404, "not_found")
            assert (await models(client))["active_versions"] == {NAME: version(OLD)}
        assert len(factory.built) == 1

    run(test())


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-token"),
        pytest.param("Bearer wrong-token-123456", id="wrong-token"),
        pytest.param(f"Bearer {API}", id="api-token"),
        pytest.param(f"Basic {ADMIN}", id="not-bearer"),
    ],
)
def test_admin_routes_refuse_anything_but_the_admin_token(
    method: str, path: str, body: dict[str, str] | None, authorization: str | None
) -> None:
    async def test() -> None:
        factory = engines()
        headers = {"authorization": authorization} if authorization else {}
        async with serve(make_app(factory, api_tokens=[API])) as client:
            response = await client.request(method, path, json=body, headers=headers)
            error = assert_envelope(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
            for secret in (ADMIN, API, "wrong-token-123456"):
                assert secret not in response.text
                assert secret not in str(response.headers)
            assert error["details"] is None
            # Nothing was done: the old version is active, and alone.
            listing = await client.get("/v1/models", headers={"authorization": f"Bearer {API}"})
            assert [m["state"] for m in listing.json()["models"]] == ["active"]
        assert len(factory.built) == 1
        assert factory.built[0].stops == 1  # at shutdown only

    run(test())


def test_models_list_needs_an_api_token_when_they_are_set() -> None:
    async def test() -> None:
        async with serve(make_app(engines(), api_tokens=[API])) as client:
            assert_envelope(await client.get("/v1/models"), 401, "unauthorized")
            listing = await client.get("/v1/models", headers={"authorization": f"Bearer {API}"})
            assert listing.status_code == 200, listing.text

    run(test())


# --- loading ----------------------------------------------------------------------------------


def test_a_load_answers_202_at_once_and_loads_in_the_background_with_a_full_warm_up() -> None:
    async def test() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = gate
        async with serve(make_app(factory)) as client:
            accepted = await load(client, NEW)
            assert accepted == {
                "name": NAME,
                "version": version(NEW),
                "path": str(NEW),
                "state": "loading",
            }
            listing = await models(client)
            assert listing["active"]["version"] == version(OLD)
            assert listing["default"] == NAME
            assert listing["active_versions"] == {NAME: version(OLD)}
            loading = await listed(client, version(NEW))
            assert loading is not None
            assert loading["state"] == "loading"
            assert loading["path"] == str(NEW)
            assert loading["loaded_at"] is None
            # The old version serves meanwhile.
            assert await reward_and_version(client) == (pytest.approx(0.4), version(OLD))
            assert await healthy(client)
            gate.set()
            ready = await until_listed(client, version(NEW), "ready")
            assert ready is not None
            assert ready["loaded_at"] is not None
            assert ready["activated_at"] is None
            assert ready["error"] is None
            assert factory.last(NEW).full_warm_ups == 1
            assert factory.last(OLD).full_warm_ups == 0
            # Loaded but not activated: the old version still answers unpinned requests.
            assert await reward_and_version(client) == (pytest.approx(0.4), version(OLD))

    run(test())


def test_a_load_with_activate_swaps_and_the_previous_is_unloaded() -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory)) as client:
            await load(client, NEW, activate=True)
            await until_listed(client, version(NEW), "active")
            assert await reward_and_version(client) == (pytest.approx(10.4), version(NEW))
            await until_listed(client, version(OLD), None)
            assert factory.last(OLD).stops == 1
            listing = await models(client)
            assert listing["active_versions"] == {NAME: version(NEW)}
            assert [m["version"] for m in listing["models"]] == [version(NEW)]
            exposition = (await client.get("/metrics")).text
            assert metric(exposition, "crs_model_swaps_total") == 1
            info = {"name": NAME, "version": version(NEW)}
            assert metric(exposition, "crs_model_info", info) == 1
            assert metric(exposition, "crs_model_loads_total", {"outcome": "ready"}) == 2

    run(test())


def test_keep_previous_keeps_the_old_version_ready_and_rolls_back_to_it() -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory, keep_previous=True)) as client:
            await load(client, NEW, activate=True)
            await until_listed(client, version(OLD), "ready")
            assert factory.last(OLD).stops == 0
            response = await activate(client, version(OLD))
            assert response.status_code == 200, response.text
            assert response.json() == {
                "name": NAME,
                "version": version(OLD),
                "state": "active",
                "previous": version(NEW),
                "changed": True,
            }
            assert await reward_and_version(client) == (pytest.approx(0.4), version(OLD))
            await until_listed(client, version(NEW), "ready")
            assert [e.stops for e in factory.built] == [0, 0]

    run(test())


def test_a_failed_load_is_listed_with_its_reason_and_the_active_version_serves() -> None:
    async def test() -> None:
        factory = engines()
        factory.models[NEW].fail_load = "CUDA out of memory while loading"
        async with serve(make_app(factory)) as client:
            await load(client, NEW, activate=True)
            failed = await until_listed(client, version(NEW), "failed")
            assert failed is not None
            assert failed["error"] == "CUDA out of memory while loading"
            for _ in range(3):
                assert await reward_and_version(client) == (pytest.approx(0.4), version(OLD))
            assert (await models(client))["active_versions"] == {NAME: version(OLD)}
            assert await healthy(client)
            response = await activate(client, version(NEW))
            assert "failed" in assert_envelope(response, 409, "conflict")["message"]
            exposition = (await client.get("/metrics")).text
            assert metric(exposition, "crs_model_loads_total", {"outcome": "failed"}) == 1

    run(test())


def test_a_directory_that_cannot_be_a_model_is_422_and_frees_the_name() -> None:
    async def test() -> None:
        factory = engines()
        factory.models[THIRD] = FakeModel(unidentifiable="/m/third has no config.json")
        async with serve(make_app(factory)) as client:
            response = await client.post(
                "/admin/models", json={"path": str(THIRD)}, headers=ADMIN_HEADERS
            )
            error = assert_envelope(response, 422, "invalid_model")
            assert "/m/third has no config.json" in error["message"]
            assert factory.last(THIRD).stops == 1
            assert [m["version"] for m in (await models(client))["models"]] == [version(OLD)]
            await load(client, NEW)  # the name is not busy
            await until_listed(client, version(NEW), "ready")

    run(test())


# --- golden sets ------------------------------------------------------------------------------


def golden_file(tmp_path: Path, offset: float) -> Path:
    """Three items with the rewards an engine of ``offset`` gives them."""
    chat = [{"role": "user", "content": "Hi"}]
    items: list[tuple[Prompt, str]] = [("P", "abcd"), ("Q", "a longer response"), (chat, "hello")]
    path = tmp_path / "golden.jsonl"
    lines = [
        json.dumps({"prompt": p, "response": r, "reward": fake_reward(p, r) + offset})
        for p, r in items
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_golden_set_that_matches_lets_the_load_be_ready(tmp_path: Path) -> None:
    async def test() -> None:
        factory = engines()
        golden = golden_file(tmp_path, OFFSETS[NEW])
        async with serve(make_app(factory)) as client:
            await load(client, NEW, golden=str(golden))
            ready = await until_listed(client, version(NEW), "ready")
            assert ready is not None
            assert ready["error"] is None
            # The golden items were scored by the new engine.
            assert [len(call.items) for call in factory.last(NEW).calls] == [3]

    run(test())


def test_a_version_is_ready_only_once_its_golden_set_passed(tmp_path: Path) -> None:
    """A rollout activates replicas once each says "ready": that must mean checked."""

    async def test() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].score_gate = gate
        golden = golden_file(tmp_path, OFFSETS[NEW])
        async with serve(make_app(factory)) as client:
            await load(client, NEW, golden=str(golden))
            await until(lambda: len(factory.last(NEW).calls) == 1)  # the check runs
            checking = await listed(client, version(NEW))
            assert checking is not None
            assert checking["state"] == "loading"
            assert checking["loaded_at"] is None
            gate.set()
            await until_listed(client, version(NEW), "ready")

    run(test())


def test_a_golden_mismatch_fails_the_load_naming_an_item(tmp_path: Path) -> None:
    async def test() -> None:
        factory = engines()
        golden = golden_file(tmp_path, 0.0)  # the old model's scores: the new one is 10 off
        async with serve(make_app(factory)) as client:
            await load(client, NEW, golden=str(golden), activate=True)
            failed = await until_listed(client, version(NEW), "failed")
            assert failed is not None
            assert failed["error"].startswith("golden mismatch: 3 of 3 items")
            assert "item 0 scored 10.4, expected 0.4" in failed["error"]
            assert factory.last(NEW).stops == 1  # its memory went back
            assert await reward_and_version(client) == (pytest.approx(0.4), version(OLD))
            exposition = (await client.get("/metrics")).text
            # One outcome per load: the configured one ready, this one failed.
            assert metric(exposition, "crs_model_loads_total", {"outcome": "ready"}) == 1
            assert metric(exposition, "crs_model_loads_total", {"outcome": "failed"}) == 1

    run(test())


def test_a_golden_tolerance_in_the_body_is_used(tmp_path: Path) -> None:
    async def test() -> None:
        factory = engines()
        golden = golden_file(tmp_path, 0.0)
        async with serve(make_app(factory)) as client:
            await load(client, NEW, golden=str(golden), golden_tolerance=11.0)
            await until_listed(client, version(NEW), "ready")

    run(test())


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(None, "No such file", id="missing"),
        pytest.param("{not json\n", "", id="not-json"),
        pytest.param('{"prompt": "P", "response": "a"}\n', "needs a finite number", id="no-reward"),
        pytest.param("[1, 2]\n", "line 1 is not an object", id="not-an-object"),
        pytest.param("\n\n", "no items", id="empty"),
    ],
)
def test_an_unreadable_golden_file_is_422_before_anything_loads(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    async def test() -> None:
        factory = engines()
        golden = tmp_path / "golden.jsonl"
        if content is not None:
            golden.write_text(content, encoding="utf-8")
        async with serve(make_app(factory)) as client:
            response = await client.post(
                "/admin/models",
                json={"path": str(NEW), "golden": str(golden)},
                headers=ADMIN_HEADERS,
            )
            error = assert_envelope(response, 422, "invalid_golden")
            assert reason in error["message"]
            assert len(factory.built) == 1
            assert [m["version"] for m in (await models(client))["models"]] == [version(OLD)]

    run(test())


# --- admin conflicts, unknown versions, unloading ---------------------------------------------


def test_a_second_admin_call_while_a_load_runs_is_409() -> None:
    async def test() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = gate
        async with serve(make_app(factory)) as client:
            await load(client, NEW)
            response = await client.post(
                "/admin/models", json={"path": str(THIRD)}, headers=ADMIN_HEADERS
            )
            assert "busy" in assert_envelope(response, 409, "conflict")["message"]
            assert_envelope(await activate(client, version(NEW)), 409, "conflict")
            assert_envelope(await load_again(client, NEW), 409, "conflict")
            gate.set()
            await until_listed(client, version(NEW), "ready")
            # A version held already is refused once the name is free, too.
            error = assert_envelope(await load_again(client, NEW), 409, "conflict")
            assert "already ready" in error["message"]
            response = await activate(client, version(NEW))
            assert response.status_code == 200, response.text
            assert response.json()["changed"] is True

    run(test())


async def load_again(client: httpx.AsyncClient, path: Path) -> httpx.Response:
    return await client.post("/admin/models", json={"path": str(path)}, headers=ADMIN_HEADERS)


@pytest.mark.parametrize("method", ["activate", "unload"])
def test_an_unknown_version_is_404(method: str) -> None:
    async def test() -> None:
        async with serve(make_app(engines())) as client:
            unknown = "rm@ffffffffffff"
            call = activate if method == "activate" else unload
            error = assert_envelope(await call(client, unknown), 404, "not_found")
            assert error["details"] == {"version": unknown}
            assert unknown in error["message"]

    run(test())


def test_activating_the_active_version_changes_nothing() -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory)) as client:
            response = await activate(client, version(OLD))
            assert response.status_code == 200, response.text
            assert response.json() == {
                "name": NAME,
                "version": version(OLD),
                "state": "active",
                "previous": version(OLD),
                "changed": False,
            }
            assert factory.last(OLD).stops == 0
            assert metric((await client.get("/metrics")).text, "crs_model_swaps_total") == 0

    run(test())


def test_unloading_the_active_version_is_409_and_a_ready_one_goes() -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory)) as client:
            error = assert_envelope(await unload(client, version(OLD)), 409, "conflict")
            assert "active" in error["message"]
            await load(client, NEW)
            await until_listed(client, version(NEW), "ready")
            response = await unload(client, version(NEW))
            assert response.status_code == 200, response.text
            assert response.json() == {"name": NAME, "version": version(NEW), "state": "unloaded"}
            assert factory.last(NEW).stops == 1
            assert await listed(client, version(NEW)) is None
            assert await reward_and_version(client) == (pytest.approx(0.4), version(OLD))

    run(test())


def test_unloading_a_loading_version_cancels_its_load() -> None:
    async def test() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = gate
        async with serve(make_app(factory)) as client:
            await load(client, NEW, activate=True)
            await until(lambda: factory.last(NEW).starts == 1)
            response = await unload(client, version(NEW))
            assert response.status_code == 200, response.text
            assert response.json() == {"name": NAME, "version": version(NEW), "state": "unloaded"}
            assert factory.last(NEW).stops == 1
            assert await listed(client, version(NEW)) is None
            await load(client, THIRD)  # the name is no longer busy
            gate.set()  # a cancelled load stays cancelled
            await until_listed(client, version(THIRD), "ready")
            assert await listed(client, version(NEW)) is None
            assert (await models(client))["active_versions"] == {NAME: version(OLD)}
            exposition = (await client.get("/metrics")).text
            assert metric(exposition, "crs_model_loads_total", {"outcome": "cancelled"}) == 1

    run(test())


# --- pinned requests --------------------------------------------------------------------------


def test_a_request_pinned_to_an_unloaded_version_is_409_naming_the_active_one() -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory)) as client:
            await load(client, NEW, activate=True)
            await until_listed(client, version(OLD), None)
            response = await client.post(
                "/v1/rewards", json={**GOOD, "model_version": version(OLD)}
            )
            error = assert_envelope(response, 409, "conflict")
            assert error["details"] == {
                "reason": "version_not_loaded",
                "requested": version(OLD),
                "active": version(NEW),
                "loaded": [version(NEW)],
            }
            assert factory.last(OLD).calls == []
            assert await reward_and_version(client, model_version=version(NEW)) == (
                pytest.approx(10.4),
                version(NEW),
            )

    run(test())


def test_a_request_pinned_to_the_draining_version_is_served_by_it() -> None:
    async def test() -> None:
        gate = asyncio.Event()
        factory = engines()
        async with serve(make_app(factory)) as client:
            old = factory.last(OLD)
            await load(client, NEW)
            await until_listed(client, version(NEW), "ready")
            old.score_gate = gate
            held = asyncio.create_task(rewards(client, GOOD))
            await until(lambda: len(old.calls) == 1)
            assert (await activate(client, version(NEW))).status_code == 200
            old.score_gate = None  # only the held request waits
            answer = await rewards(client, {**GOOD, "model_version": version(OLD)})
            assert answer["model"] == {"name": NAME, "version": version(OLD), "state": "draining"}
            assert answer["results"][0]["reward"] == pytest.approx(0.4)
            draining = await listed(client, version(OLD))
            assert draining is not None
            assert (draining["state"], draining["in_flight"]) == ("draining", 1)
            gate.set()
            assert (await held)["model"]["version"] == version(OLD)
            await until_listed(client, version(OLD), None)

    run(test())


# --- the atomic swap --------------------------------------------------------------------------


def test_a_swap_with_a_request_in_flight_finishes_it_on_the_old_version() -> None:
    async def test() -> None:
        gate = asyncio.Event()
        factory = engines()
        async with serve(make_app(factory)) as client:
            old = factory.last(OLD)
            await load(client, NEW)
            await until_listed(client, version(NEW), "ready")
            old.score_gate = gate
            held = asyncio.create_task(rewards(client, GOOD))
            await until(lambda: len(old.calls) == 1)
            response = await activate(client, version(NEW))
            assert response.status_code == 200, response.text
            assert response.json()["previous"] == version(OLD)
            # New requests go to the new version at once.
            assert await reward_and_version(client) == (pytest.approx(10.4), version(NEW))
            draining = await listed(client, version(OLD))
            assert draining is not None
            assert (draining["state"], draining["in_flight"]) == ("draining", 1)
            assert old.stops == 0
            assert not held.done()
            gate.set()
            answer = await held
            assert answer["model"] == {"name": NAME, "version": version(OLD), "state": "draining"}
            assert answer["results"][0]["reward"] == pytest.approx(0.4)
            await until(lambda: old.stops == 1)
            assert await listed(client, version(OLD)) is None
            assert factory.last(NEW).stops == 0

    run(test())


def test_health_stays_200_through_a_swap() -> None:
    async def test() -> None:
        load_gate, score_gate = asyncio.Event(), asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = load_gate
        async with serve(make_app(factory)) as client:
            old = factory.last(OLD)
            await load(client, NEW)
            assert await healthy(client)  # loading
            load_gate.set()
            await until_listed(client, version(NEW), "ready")
            assert await healthy(client)  # ready beside the active one
            old.score_gate = score_gate
            held = asyncio.create_task(rewards(client, GOOD))
            await until(lambda: len(old.calls) == 1)
            assert (await activate(client, version(NEW))).status_code == 200
            assert await healthy(client)  # draining
            ready = (await client.get("/readyz")).json()
            assert ready["model"] == {"name": NAME, "version": version(NEW)}
            score_gate.set()
            await held
            await until(lambda: old.stops == 1)
            assert await healthy(client)  # unloaded

    run(test())


def test_a_request_scored_across_a_swap_never_mixes_versions() -> None:
    """Reward and baseline of one answer come from one engine: the request held on the old
    version keeps the old baseline, the first on the new one computes the new baseline."""

    async def test() -> None:
        gate = asyncio.Event()
        factory = engines()
        app = make_app(factory)
        async with serve(app) as client:
            old, pid = factory.last(OLD), sha256_id("P")
            await put_baselines(client, ["P"])  # cached under OLD
            await load(client, NEW)
            await until_listed(client, version(NEW), "ready")
            old.score_gate = gate
            held = asyncio.create_task(contrastive(client, "P"))
            await until(lambda: len(old.calls) == 2)  # the upload, then the held request
            assert (await activate(client, version(NEW), rebaseline="lazy")).status_code == 200
            first = await contrastive(client, "P")
            gate.set()
            before = await held
            store = services_of(app).baselines.store
            cached = await store.lookup([pid], version(NEW))
        assert before["model"]["version"] == version(OLD)
        [result] = before["results"]
        assert result["reward"] == pytest.approx(0.6)
        assert result["baseline_source"] == "cache"
        assert result["baseline"] == pytest.approx(BASE.mean())
        assert result["contrastive"] == pytest.approx(0.6 - BASE.mean())
        assert first["model"]["version"] == version(NEW)
        [result] = first["results"]
        assert result["reward"] == pytest.approx(10.6)
        assert result["baseline_source"] == "computed"
        assert result["baseline"] == pytest.approx(BASE.mean() + 10)
        assert result["contrastive"] == pytest.approx(0.6 - BASE.mean())
        # Cached under the version that scored them, and only there.
        assert cached[pid].rewards == pytest.approx(list(BASE + 10))

    run(test())


class GatedLookups(MemoryBaselineStore):
    """A memory store whose lookups wait for ``lookup_gate`` while it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.lookup_gate: asyncio.Event | None = None
        self.lookups_held = 0

    async def lookup(
        self,
        prompt_ids: Sequence[str],
        version: str,
        *,
        with_responses: bool = False,
        partial: bool = False,
    ) -> dict[str, StoredPrompt]:
        if (gate := self.lookup_gate) is not None:
            self.lookups_held += 1
            await gate.wait()
        return await super().lookup(
            prompt_ids, version, with_responses=with_responses, partial=partial
        )


def test_a_baseline_computed_on_the_old_version_across_the_swap_is_the_old_versions() -> None:
    """A request that took the old version before the swap computes its baseline after it,
    with the old engine; while that computation runs, the first request on the new version
    computes its own rather than joining it: each answer, and each list cached, is one
    engine's."""

    async def test() -> None:
        lookup_gate, score_gate = asyncio.Event(), asyncio.Event()
        factory = engines()
        app = make_app(factory)
        store = GatedLookups()
        services_of(app).baselines.store = store
        async with serve(app) as client:
            old, pid = factory.last(OLD), sha256_id("P")
            # Stored responses that neither version has scored yet.
            seed = BaselineWrite(
                prompt_id=pid, prompt="P", responses=RESPONSES, version="seed@0", rewards=[0.0] * 4
            )
            await store.write([seed])
            await load(client, NEW)
            await until_listed(client, version(NEW), "ready")
            new = factory.last(NEW)
            store.lookup_gate, old.score_gate = lookup_gate, score_gate
            held = asyncio.create_task(contrastive(client, "P"))
            # Leased OLD; its item waits in the engine, its baseline lookup in the store.
            await until(lambda: store.lookups_held == 1 and len(old.calls) == 1)
            store.lookup_gate = None
            assert (await activate(client, version(NEW), rebaseline="lazy")).status_code == 200
            lookup_gate.set()
            await until(lambda: len(old.calls) == 2)  # the old baseline is being computed
            async with asyncio.timeout(5):  # not behind the old computation
                first = await contrastive(client, "P")
            score_gate.set()
            before = await held
            cached_old = await store.lookup([pid], version(OLD))
            cached_new = await store.lookup([pid], version(NEW))
        # Each engine scored its request's item and the baseline responses, nothing more.
        for engine in (old, new):
            assert sorted(len(call.items) for call in engine.calls) == [1, len(RESPONSES)]
        for answer, path in ((before, OLD), (first, NEW)):
            assert answer["model"]["version"] == version(path)
            [result] = answer["results"]
            assert result["reward"] == pytest.approx(0.6 + OFFSETS[path])
            assert result["baseline_source"] == "computed"
            assert result["baseline"] == pytest.approx(BASE.mean() + OFFSETS[path])
        assert cached_old[pid].rewards == pytest.approx(list(BASE))
        assert cached_new[pid].rewards == pytest.approx(list(BASE + 10))

    run(test())


# --- baselines follow the model -------------------------------------------------------------

PROMPTS = ["P", "Q", "R"]


@pytest.mark.parametrize("how", ["load", "activate"])
def test_an_eager_activation_rescores_the_stored_baselines_first(how: str) -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory)) as client:
            await put_baselines(client, PROMPTS)
            if how == "load":
                await load(client, NEW, activate=True, rebaseline="eager")
                active = await until_listed(client, version(NEW), "active")
            else:
                await load(client, NEW)
                await until_listed(client, version(NEW), "ready")
                response = await activate(client, version(NEW), rebaseline="eager")
                assert response.status_code == 200, response.text
                active = await listed(client, version(NEW))  # done before it answered
            assert active is not None
            progress = active["rebaseline"]
            assert progress["state"] == "done"
            assert progress["prompts_done"] == progress["prompts_total"] == len(PROMPTS)
            assert progress["responses_scored"] == len(PROMPTS) * len(RESPONSES)
            assert progress["error"] is None
            new = factory.last(NEW)
            calls = len(new.calls)
            [result] = (await contrastive(client, "P"))["results"]
            assert len(new.calls) == calls + 1  # the item only: its baseline was cached
        assert result["baseline_source"] == "cache"
        assert result["baseline"] == pytest.approx(BASE.mean() + 10)
        assert result["reward"] == pytest.approx(10.6)

    run(test())


def test_a_lazy_activation_computes_baselines_at_first_use() -> None:
    async def test() -> None:
        factory = engines()
        async with serve(make_app(factory)) as client:
            await put_baselines(client, PROMPTS)
            await load(client, NEW, activate=True, rebaseline="lazy")
            active = await until_listed(client, version(NEW), "active")
            assert active is not None
            assert active["rebaseline"] is None
            assert factory.last(NEW).calls == []
            [result] = (await contrastive(client, "P"))["results"]
            [again] = (await contrastive(client, "P"))["results"]
        assert result["baseline_source"] == "computed"
        assert result["baseline"] == pytest.approx(BASE.mean() + 10)
        assert again["baseline_source"] == "cache"

    run(test())


class PromptIndexDown(MemoryBaselineStore):
    """A memory store whose prompt index does not answer: a rebaseline pass cannot run."""

    async def prompt_ids(self, cursor: str, count: int) -> tuple[str, list[str]]:
        raise StoreUnavailable("the prompt index is unreachable")


def test_a_failed_rebaseline_refuses_the_activation_and_the_old_version_stays() -> None:
    async def test() -> None:
        factory = engines()
        app = make_app(factory)
        services_of(app).baselines.store = PromptIndexDown()
        async with serve(app) as client:
            await put_baselines(client, PROMPTS)
            await load(client, NEW)
            await until_listed(client, version(NEW), "ready")
            response = await activate(client, version(NEW))
            error = assert_envelope(response, 503, "activation_failed")
            assert "the prompt index is unreachable" in error["message"]
            assert "Retry-After" in response.headers
            listing = await models(client)
            assert listing["active_versions"] == {NAME: version(OLD)}
            entry = await listed(client, version(NEW))
            assert entry is not None
            assert entry["state"] == "ready"
            assert entry["error"].startswith("activation failed: ")
            assert entry["rebaseline"]["state"] == "failed"
            assert await reward_and_version(client) == (pytest.approx(0.4), version(OLD))
            assert factory.last(OLD).stops == 0
            # Lazy needs no pass: the operator's way out.
            response = await activate(client, version(NEW), rebaseline="lazy")
            assert response.status_code == 200, response.text
            assert await reward_and_version(client) == (pytest.approx(10.4), version(NEW))

    run(test())


# --- several named models ---------------------------------------------------------------------

HELP, HARM, HARM2 = Path("/m/h"), Path("/m/x"), Path("/m/x2")


def two_models() -> FakeEngines:
    return FakeEngines(
        {
            HELP: FakeModel(reward_offset=0.0),
            HARM: FakeModel(reward_offset=100.0),
            HARM2: FakeModel(reward_offset=200.0),
        }
    )


def two_models_app(factory: FakeEngines) -> FastAPI:
    settings = Settings(
        models=[f"help={HELP}", f"harm={HARM}"], admin_token=ADMIN, drain_idle_s=0.0
    )
    return create_app(settings, engine_factory=factory)


def test_two_named_models_each_score_what_names_them() -> None:
    async def test() -> None:
        factory = two_models()
        async with serve(two_models_app(factory)) as client:
            ready = (await client.get("/readyz")).json()
            assert ready["models"] == {"help": version(HELP, "help"), "harm": version(HARM, "harm")}
            assert ready["model"] == {"name": "help", "version": version(HELP, "help")}
            listing = await models(client)
            assert listing["default"] == "help"
            assert [(m["name"], m["default"]) for m in listing["models"]] == [
                ("help", True),
                ("harm", False),
            ]
            assert await reward_and_version(client) == (
                pytest.approx(0.4),
                version(HELP, "help"),
            )
            assert await reward_and_version(client, model="harm") == (
                pytest.approx(100.4),
                version(HARM, "harm"),
            )
            assert await reward_and_version(client, model="help") == (
                pytest.approx(0.4),
                version(HELP, "help"),
            )

    run(test())


def test_baselines_pushed_for_a_named_model_are_that_models() -> None:
    async def test() -> None:
        factory = two_models()
        async with serve(two_models_app(factory)) as client:
            pushed = await put_baselines(client, ["P"], model="harm")
            assert pushed["model"]["version"] == version(HARM, "harm")
            assert pushed["results"][0]["mean"] == pytest.approx(BASE.mean() + 100)
            harm = await contrastive(client, "P", model="harm")
            help_ = await contrastive(client, "P")
            listed_ = await client.get("/v1/baselines", params={"model": "harm"})
        [result] = harm["results"]
        assert (result["baseline_source"], result["reward"]) == ("cache", pytest.approx(100.6))
        assert result["baseline"] == pytest.approx(BASE.mean() + 100)
        # The responses are the prompt's; the help model scores them itself.
        [result] = help_["results"]
        assert (result["baseline_source"], result["reward"]) == ("computed", pytest.approx(0.6))
        assert result["baseline"] == pytest.approx(BASE.mean())
        assert listed_.status_code == 200, listed_.text

    run(test())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("POST", "/v1/rewards", {**GOOD, "model": "nope"}, id="rewards"),
        pytest.param(
            "PUT",
            "/v1/baselines",
            {"items": [{"prompt": "P", "responses": ["a"]}], "model": "nope"},
            id="baselines",
        ),
    ],
)
def test_an_unknown_model_name_is_404_listing_the_names(
    method: str, path: str, body: dict[str, Any]
) -> None:
    async def test() -> None:
        factory = two_models()
        async with serve(two_models_app(factory)) as client:
            response = await client.request(method, path, json=body)
            error = assert_envelope(response, 404, "not_found")
            assert error["details"] == {"model": "nope", "models": ["help", "harm"]}
        assert all(engine.calls == [] for engine in factory.built)

    run(test())


def test_a_swap_of_one_name_leaves_the_other_alone() -> None:
    async def test() -> None:
        factory = two_models()
        async with serve(two_models_app(factory)) as client:
            accepted = await load(client, HARM2, name="harm", activate=True)
            assert accepted["version"] == version(HARM2, "harm")
            await until_listed(client, version(HARM2, "harm"), "active")
            await until(lambda: factory.last(HARM).stops == 1)
            listing = await models(client)
            assert listing["active_versions"] == {
                "help": version(HELP, "help"),
                "harm": version(HARM2, "harm"),
            }
            assert listing["active"]["version"] == version(HELP, "help")
            assert factory.last(HELP).stops == 0
            assert await reward_and_version(client) == (
                pytest.approx(0.4),
                version(HELP, "help"),
            )
            assert await reward_and_version(client, model="harm") == (
                pytest.approx(200.4),
                version(HARM2, "harm"),
            )
            assert await healthy(client)

    run(test())


def test_a_load_without_a_name_swaps_the_default_model() -> None:
    async def test() -> None:
        factory = two_models()
        async with serve(two_models_app(factory)) as client:
            accepted = await load(client, HARM2)
            assert (accepted["name"], accepted["version"]) == ("help", version(HARM2, "help"))

    run(test())
