"""A torch-free ``RewardEngine`` for API tests, and a helper that serves an app to a client.

The fake's rewards and token counts are simple functions of the text, so tests can compute the
expected values independently; gates let a test hold the load or a score call in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from service.app import create_app
from service.scoring.batcher import DeviceHealth
from service.scoring.engine import EngineState
from service.scoring.registry import ModelSpec
from service.scoring.types import (
    InputTooLong,
    ModelInfo,
    ModelLoadError,
    Prompt,
    RewardInput,
    Score,
)
from service.settings import Settings, Truncation

FAKE_NAME = "fake-rm"
FAKE_VERSION = "fake-rm@0123456789ab"


def prompt_text(prompt: Prompt) -> str:
    """The prompt as plain text: the string, or the message contents joined by spaces."""
    if isinstance(prompt, str):
        return prompt
    return " ".join(message["content"] for message in prompt)


def fake_reward(prompt: Prompt, response: str) -> float:
    """The fake's reward: a tenth of the response length, plus 0.5 for a chat prompt."""
    return len(response) / 10 + (0.0 if isinstance(prompt, str) else 0.5)


def fake_tokens(prompt: Prompt, response: str) -> int:
    """The fake's token count: whitespace-split words of prompt and response, plus 2."""
    return len(f"{prompt_text(prompt)} {response}".split()) + 2


@dataclass(frozen=True, kw_only=True)
class ScoreCall:
    """One call of ``FakeEngine.score`` as the API made it."""

    items: list[RewardInput]
    truncation: Truncation


class FakeEngine:
    """Implements ``RewardEngine`` with deterministic rewards and no model.

    ``load_gate`` / ``score_gate``: when set, ``astart`` / ``score`` wait for the event, so a
    test can observe the "loading" state or a request in flight. ``fail_load``: ``astart``
    fails with that message. ``fail_next_score``: the next ``score`` raises that exception.
    ``devices``: what ``device_health`` reports (one live thread; a test may kill them).
    """

    def __init__(
        self,
        *,
        name: str = FAKE_NAME,
        version: str = FAKE_VERSION,
        max_input_tokens: int = 1_000_000,
        load_gate: asyncio.Event | None = None,
        score_gate: asyncio.Event | None = None,
        fail_load: str | None = None,
        path: Path = Path("/models/fake-rm"),
        reward_offset: float = 0.0,
    ) -> None:
        self.name = name
        self.path = path
        self.reward_offset = reward_offset
        self.full_warm_ups = 0
        self.version = version
        self.max_input_tokens = max_input_tokens
        self.load_gate = load_gate
        self.score_gate = score_gate
        self.fail_load = fail_load
        self.calls: list[ScoreCall] = []
        self.starts = 0
        self.stops = 0
        self._score_error: Exception | None = None
        self._state: EngineState = "loading"
        self._load_error: str | None = None
        self.devices = DeviceHealth(started=1, alive=1, died=0)

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def info(self) -> ModelInfo | None:
        if self._state != "ready":
            return None
        return self.identity

    @property
    def identity(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            path=self.path,
            device="cpu",
            dtype="float32",
            input_format="pair",
            max_input_tokens=self.max_input_tokens,
            label_index=0,
        )

    @property
    def load_error(self) -> str | None:
        return self._load_error

    @property
    def device_health(self) -> DeviceHealth:
        return self.devices

    @property
    def items_scored(self) -> int:
        """How many items reached the engine, over all calls."""
        return sum(len(call.items) for call in self.calls)

    def fail_next_score(self, error: Exception) -> None:
        """Make the next ``score`` call raise ``error`` (once)."""
        self._score_error = error

    async def aidentify(self) -> ModelInfo:
        return self.identity

    async def astart(self, *, full_warm_up: bool = False) -> None:
        self.starts += 1
        self.full_warm_ups += full_warm_up
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.fail_load is not None:
            self._state = "failed"
            self._load_error = self.fail_load
            raise RuntimeError(self.fail_load)
        self._state = "ready"

    async def astop(self) -> None:
        self.stops += 1
        self._state = "stopped"

    async def score(self, items: Sequence[RewardInput], *, truncation: Truncation) -> list[Score]:
        self.calls.append(ScoreCall(items=list(items), truncation=truncation))
        if self.score_gate is not None:
            await self.score_gate.wait()
        if self._score_error is not None:
            error, self._score_error = self._score_error, None
            raise error
        limit = self.max_input_tokens
        lengths = [fake_tokens(item.prompt, item.response) for item in items]
        over = {index: n for index, n in enumerate(lengths) if n > limit}
        if over and truncation == "none":
            raise InputTooLong(over, limit)
        return [
            Score(
                reward=fake_reward(item.prompt, item.response) + self.reward_offset,
                tokens=min(n, limit),
                truncated=n > limit,
            )
            for item, n in zip(items, lengths, strict=True)
        ]

    async def wait_settled(self, timeout: float = 2.0) -> None:
        """Return once the load has finished (ready or failed)."""
        async with asyncio.timeout(timeout):
            while self._state == "loading":
                await asyncio.sleep(0.001)


class UnidentifiableEngine(FakeEngine):
    """A fake whose directory cannot be a model: ``aidentify`` raises ``ModelLoadError``."""

    def __init__(self, reason: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reason = reason

    async def aidentify(self) -> ModelInfo:
        raise ModelLoadError(self.reason)


def fake_version(name: str, path: Path) -> str:
    """The version ``FakeEngines`` gives the model at ``path``: a digest of the path, so each
    directory is one version."""
    return f"{name}@{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


@dataclass(kw_only=True)
class FakeModel:
    """How the engines ``FakeEngines`` builds for one directory behave; change it between
    loads (a fixed model directory loads again)."""

    reward_offset: float = 0.0
    load_gate: asyncio.Event | None = None
    score_gate: asyncio.Event | None = None
    fail_load: str | None = None
    unidentifiable: str | None = None  # aidentify raises ModelLoadError with this reason


@dataclass
class FakeEngines:
    """An engine factory for ``create_app(engine_factory=...)`` and ``ModelRegistry``: a new
    ``FakeEngine`` per version loaded, named by the spec's name (else ``FAKE_NAME``), its
    version from its path, behaving as ``models[path]`` says. ``built`` keeps every engine
    made, in order, and ``specs`` what each was built for."""

    models: dict[Path, FakeModel] = field(default_factory=dict)
    built: list[FakeEngine] = field(default_factory=list)
    specs: list[ModelSpec] = field(default_factory=list)

    def __call__(self, spec: ModelSpec, *_: object) -> FakeEngine:
        self.specs.append(spec)
        path = spec.path or Path("/models/fake-rm")
        name = spec.name or FAKE_NAME
        model = self.models.get(path, FakeModel())
        options: dict[str, Any] = {
            "name": name,
            "version": fake_version(name, path),
            "path": path,
            "reward_offset": model.reward_offset,
            "load_gate": model.load_gate,
            "score_gate": model.score_gate,
            "fail_load": model.fail_load,
        }
        engine = (
            UnidentifiableEngine(model.unidentifiable, **options)
            if model.unidentifiable is not None
            else FakeEngine(**options)
        )
        self.built.append(engine)
        return engine

    def last(self, path: Path) -> FakeEngine:
        """The engine built last for ``path``."""
        return [engine for engine in self.built if engine.path == path][-1]


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` with its lifespan running; app exceptions come back as 500s."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        yield client


class LiveApp:
    """An app with its lifespan running in a task of its own loop; requests run on that loop.

    One app serves every example of a property test, so each example costs one request.
    """

    def __init__(
        self,
        engine: FakeEngine | None = None,
        settings: Settings | None = None,
        *,
        direct_routes: bool = True,
    ) -> None:
        self.engine = engine or FakeEngine()
        self.app = create_app(
            settings or Settings(),
            engine_factory=lambda *_: self.engine,
            direct_routes=direct_routes,
        )
        self.loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None
        self._started: asyncio.Future[None] = self.loop.create_future()
        self._stop: asyncio.Future[None] = self.loop.create_future()
        self._holder = self.loop.create_task(self._hold())
        self.loop.run_until_complete(asyncio.wait_for(asyncio.shield(self._started), 10))

    async def _hold(self) -> None:
        try:
            async with serve(self.app) as client:
                await self.engine.wait_settled()
                self._client = client
                self._started.set_result(None)
                await self._stop
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    def post(self, content: bytes, path: str = "/v1/rewards") -> httpx.Response:
        """POST ``content`` as the JSON body (to /v1/rewards unless told)."""
        return self.request("POST", path, content=content)

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One request on the app's loop; a body is declared JSON unless ``headers`` say."""
        assert self._client is not None
        if json_body is not None:
            content = json.dumps(json_body).encode()
        declared = {"content-type": "application/json"} if content is not None else {}
        headers = {**declared, **(headers or {})}
        request = self._client.request(method, path, content=content, headers=headers)
        return self.loop.run_until_complete(request)

    def close(self) -> None:
        self._stop.set_result(None)
        self.loop.run_until_complete(self._holder)
        self.loop.close()
