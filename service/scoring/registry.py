"""The model registry: every loaded version of every named reward model, and hot swaps.

Each version is one entry with its own engine (model, formatter, batcher), so every batch runs
wholly on one version by construction. A request takes one ``Lease`` of one version and uses it
for its rewards and its baselines; activation swaps the name's active entry in one step (the
event loop runs one coroutine at a time), so a lease taken before the swap finishes on the old
version, which drains and is then unloaded (or kept as the rollback target).

Admin operations are serialised per name: a second one while one runs is refused, never queued
(an operator who retries must not swap twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from service.scoring.batcher import DeviceHealth
from service.scoring.engine import RewardEngine
from service.scoring.types import ModelInfo, ModelLoadError, RewardInput, Score
from service.settings import Truncation

log = logging.getLogger("crs.registry")

ModelState = Literal["loading", "ready", "active", "draining", "failed"]
Rebaseline = Literal["eager", "lazy"]
# States whose engine holds a model and can score.
SERVING: tuple[ModelState, ...] = ("active", "draining", "ready")
# States that serve a request pinned to them: a draining version finishes the calls that began
# on it (their answers say "draining", so clients move on); a ready one is not served yet.
PINNABLE: tuple[ModelState, ...] = ("active", "draining")
# Failed loads kept per name for GET /v1/models (a DELETE forgets one sooner).
FAILED_KEPT = 8
# A draining version waits this long past the request timeout for its last request.
DRAIN_GRACE_S = 10.0


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What to load: a model directory, and the name it serves under (None: its own)."""

    path: Path | None
    name: str | None = None
    label_index: int | None = None


class Reporting(Protocol):
    """Progress that ``GET /v1/models`` shows (a rebaseline pass)."""

    def as_dict(self) -> dict[str, Any]: ...


@dataclass(kw_only=True)
class EntryStatus:
    """What changes over an entry's life; everything else about it is fixed."""

    state: ModelState = "loading"
    error: str | None = None
    in_flight: int = 0
    # When the last lease ended (monotonic): a draining version lingers after it.
    last_released: float = 0.0
    loaded_at: float | None = None
    activated_at: float | None = None
    rebaseline: Reporting | None = None
    idle: asyncio.Event = field(default_factory=lambda: _event(is_set=True))


def _event(*, is_set: bool) -> asyncio.Event:
    event = asyncio.Event()
    if is_set:
        event.set()
    return event


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelEntry:
    """One version of one named model: its engine, and its state."""

    name: str
    version: str
    path: Path
    engine: RewardEngine
    status: EntryStatus = field(default_factory=EntryStatus)

    @property
    def state(self) -> ModelState:
        return self.status.state


@dataclass(frozen=True, slots=True)
class Lease:
    """One request's hold on one version: everything it scores, it scores with ``info``.
    Held from ``with`` to its end; the version is not unloaded while any lease holds it."""

    entry: ModelEntry
    info: ModelInfo

    def __enter__(self) -> Lease:
        status = self.entry.status
        status.in_flight += 1
        status.idle.clear()
        return self

    def __exit__(self, *_: object) -> None:
        status = self.entry.status
        status.in_flight -= 1
        status.last_released = time.monotonic()
        if status.in_flight == 0:
            status.idle.set()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    async def score(self, items: Sequence[RewardInput], *, truncation: Truncation) -> list[Score]:
        return await self.entry.engine.score(items, truncation=truncation)


class UnknownModel(LookupError):
    """A request named a model the service does not serve."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name, self.known = name, list(known)
        super().__init__(f"no model named {name!r}; served: {', '.join(known) or 'none'}")


class UnknownVersion(LookupError):
    """An admin operation named a version the service does not hold."""

    def __init__(self, version: str) -> None:
        self.version = version
        super().__init__(f"no model version {version} is loaded or loading")


class VersionNotLoaded(LookupError):
    """A request pinned a version that is not loaded (any more, or yet)."""

    def __init__(self, requested: str, active: str | None, loaded: Sequence[str]) -> None:
        self.requested, self.active, self.loaded = requested, active, list(loaded)
        super().__init__(
            f"model version {requested} is not loaded; the active one is {active or 'none'}"
        )


class ModelNotReady(RuntimeError):
    """No active version to serve a request yet (the first load runs, or failed)."""


class AdminConflict(RuntimeError):
    """An admin operation that the name's current state refuses (busy, wrong state)."""


class ActivationFailed(RuntimeError):
    """What had to run before an activation failed (the eager rebaseline); the previous
    version is still active."""


class RegistryObserver(Protocol):
    """Where the registry reports (the service's metrics)."""

    def models_changed(
        self, states: Mapping[str, int], active: Sequence[tuple[str, str]]
    ) -> None: ...

    def model_load_finished(self, outcome: str) -> None: ...

    def model_swapped(self) -> None: ...


EngineFactory = Callable[[ModelSpec], RewardEngine]
# Run before a version becomes active (the eager rebaseline); raising refuses the activation.
BeforeActivate = Callable[[ModelEntry], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class Activation:
    entry: ModelEntry
    previous: str | None
    changed: bool


class ModelRegistry:
    """Named models, their versions, leases and swaps (module docstring)."""

    def __init__(
        self,
        factory: EngineFactory,
        *,
        drain_timeout_s: float,
        drain_idle_s: float = 0.0,
        keep_previous: bool = False,
        observer: RegistryObserver | None = None,
    ) -> None:
        self._factory = factory
        self._drain_timeout_s = drain_timeout_s
        self._drain_idle_s = drain_idle_s
        self._keep_previous = keep_previous
        self._observer = observer
        self._names: list[str] = []
        # The names configured at start: readiness waits for these, not for names an admin adds.
        self._configured: list[str] = []
        # Per name, the drained version kept as the rollback target (CRS_KEEP_PREVIOUS).
        self._rollback: dict[str, ModelEntry] = {}
        self._entries: dict[str, dict[str, ModelEntry]] = {}
        self._active: dict[str, ModelEntry] = {}
        self._busy: dict[str, str] = {}
        self._tasks: dict[ModelEntry, asyncio.Task[None]] = {}
        self._activations: set[asyncio.Task[None]] = set()
        self._started = False
        self._start_error: str | None = None

    # --- what requests see --------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._names)

    @property
    def default_name(self) -> str | None:
        return self._names[0] if self._names else None

    @property
    def ready(self) -> bool:
        """Every configured model is loaded and active."""
        return self._started and all(name in self._active for name in self._configured)

    @property
    def not_ready_reason(self) -> str:
        if self._start_error is not None:
            return f"model load failed: {self._start_error}"
        return "model is loading"

    def active(self, name: str | None = None) -> ModelEntry | None:
        name = name or self.default_name
        return self._active.get(name) if name else None

    def entries(self) -> list[ModelEntry]:
        """Every entry, by name (in configured order), then by load time."""
        return [entry for name in self._names for entry in self._entries.get(name, {}).values()]

    def find(self, version: str) -> ModelEntry:
        for entry in self.entries():
            if entry.version == version:
                return entry
        raise UnknownVersion(version)

    @property
    def device_health(self) -> DeviceHealth:
        """Device threads of every version that holds a model, summed."""
        healths = [e.engine.device_health for e in self.entries() if e.state in SERVING]
        return DeviceHealth(
            started=sum(h.started for h in healths),
            alive=sum(h.alive for h in healths),
            died=sum(h.died for h in healths),
        )

    def lease(self, name: str | None = None, version: str | None = None) -> Lease:
        """A lease of one version of ``name`` (default: the first model), to hold with
        ``with``: ``version`` when given (while it is loaded), else the active one. Raises at
        once when there is none; enter it before the next ``await``."""
        return self.lease_of(self._pick(name, version))

    def lease_of(self, entry: ModelEntry) -> Lease:
        """A lease of this entry (the registry's own work on a version that is not active)."""
        info = entry.engine.info
        if info is None or entry.state not in SERVING:
            raise ModelNotReady(f"model version {entry.version} is {entry.state}")
        return Lease(entry, info)

    def _pick(self, name: str | None, version: str | None) -> ModelEntry:
        if not self._names:
            raise ModelNotReady(self.not_ready_reason)
        name = name or self._names[0]
        if name not in self._names:
            raise UnknownModel(name, self._names)
        active = self._active.get(name)
        if version is None:
            if active is None:
                raise ModelNotReady(self.not_ready_reason)
            return active
        entry = self._entries[name].get(version)
        if entry is None or entry.state not in PINNABLE:
            loaded = [v for v, e in self._entries[name].items() if e.state in PINNABLE]
            raise VersionNotLoaded(version, active.version if active else None, loaded)
        return entry

    # --- start and stop -----------------------------------------------------------------------

    async def start(self, specs: Sequence[ModelSpec]) -> None:
        """Load and activate the configured models, one after another; raises on the first
        that fails (the service cannot serve without it)."""
        try:
            for spec in specs:
                entry = await self._identified(spec)
                if entry.name in self._names:
                    raise AdminConflict(f"two configured models are named {entry.name!r}")
                self._names.append(entry.name)
                self._configured.append(entry.name)
                self._add(entry)
                await self._load(entry, full_warm_up=False)
                self._activate_now(entry)
        except Exception as exc:
            self._start_error = str(exc)
            raise
        self._started = True

    async def astop(self) -> None:
        """Cancel loads, activations and drains, and release every engine."""
        tasks = [*self._tasks.values(), *self._activations]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for entry in self.entries():
            await entry.engine.astop()
        self._active.clear()
        self._changed()

    # --- admin operations ---------------------------------------------------------------------

    async def load(
        self,
        spec: ModelSpec,
        *,
        activate: bool,
        before_activate: BeforeActivate | None,
        check: Callable[[ModelEntry], Awaitable[None]] | None = None,
    ) -> ModelEntry:
        """Identify ``spec`` and load it in the background (``check`` runs on the warm engine,
        e.g. the golden set; raising fails the load); returns the loading entry. With
        ``activate`` the same background task activates it once ready."""
        self._require_started()
        name = spec.name or self.default_name
        assert name is not None
        with self._claim(name, f"loading {spec.path}") as release:
            entry = await self._identified(
                ModelSpec(path=spec.path, name=name, label_index=spec.label_index)
            )
            if (held := self._entries.get(name, {}).get(entry.version)) is not None:
                if held.state != "failed":
                    await entry.engine.astop()  # identified only, but it holds threads
                    raise AdminConflict(f"model version {entry.version} is already {held.state}")
                self._forget(held)
            if name not in self._names:
                self._names.append(name)
            self._add(entry)
            task = asyncio.create_task(
                self._load_then(entry, activate, before_activate, check, release),
                name=f"load {entry.version}",
            )
            self._tasks[entry] = task
            release.keep()  # the task holds the claim until it ends
        return entry

    async def activate(self, version: str, before_activate: BeforeActivate | None) -> Activation:
        """Make ``version`` its name's active version (after ``before_activate``); the previous
        one drains. The work runs in its own task: a caller that goes away does not stop it."""
        self._require_started()
        entry = self.find(version)
        previous = self._active.get(entry.name)
        if entry.state == "active":
            return Activation(entry=entry, previous=entry.version, changed=False)
        with self._claim(entry.name, f"activating {version}") as claim:
            if entry.state != "ready":
                raise AdminConflict(
                    f"model version {version} is {entry.state}; only a ready version can be "
                    "activated"
                )
            task = asyncio.create_task(self._activate(entry, before_activate))
            self._activations.add(task)  # cancelled by astop (a rebaseline can be long)
            task.add_done_callback(self._activations.discard)
            claim.hand_to(task)  # the name stays busy until it ends, caller gone or not
            await asyncio.shield(task)
        return Activation(
            entry=entry, previous=previous.version if previous else None, changed=True
        )

    async def unload(self, version: str) -> ModelEntry:
        """Unload a ready or failed version, or cancel a load in progress."""
        self._require_started()
        entry = self.find(version)
        if entry.state == "loading":
            task = self._tasks.get(entry)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            return entry
        if entry.state == "active":
            raise AdminConflict(
                f"model version {version} is active; activate another version first"
            )
        if entry.state == "draining":
            raise AdminConflict(
                f"model version {version} is draining; it is unloaded once its requests finish"
            )
        with self._claim(entry.name, f"unloading {version}"):
            await self._unload(entry)
        return entry

    # --- internals ----------------------------------------------------------------------------

    async def _identified(self, spec: ModelSpec) -> ModelEntry:
        engine = self._factory(spec)
        try:
            info = await engine.aidentify()
        except BaseException as exc:
            await engine.astop()
            if isinstance(exc, OSError):  # an unreadable file, a permission
                raise ModelLoadError(f"cannot read the model at {spec.path}: {exc}") from exc
            raise
        return ModelEntry(name=info.name, version=info.version, path=info.path, engine=engine)

    async def _load(
        self,
        entry: ModelEntry,
        *,
        full_warm_up: bool,
        check: Callable[[ModelEntry], Awaitable[None]] | None = None,
    ) -> None:
        try:
            await entry.engine.astart(full_warm_up=full_warm_up)
            if check is not None:
                # Still "loading": a rollout activates a version once it says ready.
                await check(entry)
        except asyncio.CancelledError:
            await entry.engine.astop()
            self._forget(entry)
            self._load_finished("cancelled")
            raise
        except Exception as exc:
            await entry.engine.astop()  # a failed load keeps nothing: its memory goes back
            self._failed(entry, str(exc))
            raise
        entry.status.state = "ready"
        entry.status.loaded_at = time.time()
        self._load_finished("ready")
        self._changed()

    async def _load_then(
        self,
        entry: ModelEntry,
        activate: bool,
        before_activate: BeforeActivate | None,
        check: Callable[[ModelEntry], Awaitable[None]] | None,
        release: _Claim,
    ) -> None:
        """The background part of a load: load, warm, check, and activate if asked."""
        try:
            await self._load(entry, full_warm_up=True, check=check)
            log.info("model version %s loaded from %s", entry.version, entry.path)
            if activate:
                await self._activate(entry, before_activate)
        except asyncio.CancelledError:
            log.info("load of %s cancelled", entry.version)
            raise
        except Exception as exc:
            log.error("load of %s failed: %s", entry.version, exc)
        finally:
            self._tasks.pop(entry, None)
            release.release()

    async def _activate(self, entry: ModelEntry, before_activate: BeforeActivate | None) -> None:
        if before_activate is not None:
            # The entry serves this pass's scoring (through its own batcher) while ready.
            try:
                await before_activate(entry)
            except Exception as exc:
                entry.status.error = f"activation failed: {exc}"
                self._changed()
                raise ActivationFailed(str(exc)) from exc
        if entry.state != "ready":  # unloaded or failed meanwhile
            raise ActivationFailed(f"model version {entry.version} is {entry.state}")
        self._activate_now(entry)

    def _activate_now(self, entry: ModelEntry) -> None:
        """The swap itself: one assignment, no await, so no request sees a half-done one."""
        previous = self._active.get(entry.name)
        self._active[entry.name] = entry
        entry.status.state = "active"
        entry.status.activated_at = time.time()
        entry.status.error = None
        if previous is not None and previous is not entry:
            previous.status.state = "draining"
            log.info(
                "model %s: %s is active, %s drains", entry.name, entry.version, previous.version
            )
            self._tasks[previous] = asyncio.create_task(
                self._drain(previous), name=f"drain {previous.version}"
            )
        else:
            log.info("model %s: %s is active", entry.name, entry.version)
        if previous is not None and previous is not entry and self._observer is not None:
            self._observer.model_swapped()
        self._changed()

    async def _drain(self, entry: ModelEntry) -> None:
        """Wait for the requests that hold ``entry``, then unload it (or keep it ready)."""
        try:
            try:
                async with asyncio.timeout(self._drain_timeout_s):
                    await self._idle_for(entry, self._drain_idle_s)
            except TimeoutError:
                log.warning(
                    "model version %s: %d requests still in flight after %.0f s; unloading",
                    entry.version,
                    entry.status.in_flight,
                    self._drain_timeout_s,
                )
            if self._keep_previous and self._active.get(entry.name) is not entry:
                entry.status.state = "ready"
                self._changed()
                log.info("model version %s drained; kept as the rollback target", entry.version)
                # One rollback target per name: the one kept before goes, unless it is in use.
                older = self._rollback.get(entry.name)
                self._rollback[entry.name] = entry
                if older is not None and older is not entry and older.state == "ready":
                    await self._unload(older)
            elif entry.state == "draining":
                await self._unload(entry)
        finally:
            if self._tasks.get(entry) is asyncio.current_task():
                del self._tasks[entry]

    @staticmethod
    async def _idle_for(entry: ModelEntry, linger_s: float) -> None:
        """Return once no request has held ``entry`` for ``linger_s``: the later chunks of a
        call pinned to it (sent the moment its first chunk is answered) still find it."""
        status = entry.status
        while True:
            await status.idle.wait()
            left = status.last_released + linger_s - time.monotonic()
            if left <= 0 and status.in_flight == 0:
                return
            await asyncio.sleep(max(left, 0.0))

    async def _unload(self, entry: ModelEntry) -> None:
        """Forget the version, then release its engine. A release that fails is logged: the
        version is gone either way, and a drain task must not end on an unseen exception."""
        self._forget(entry)
        try:
            await entry.engine.astop()
        except Exception:
            log.exception("model version %s: releasing its engine failed", entry.version)
            return
        log.info("model version %s unloaded", entry.version)

    def _add(self, entry: ModelEntry) -> None:
        self._entries.setdefault(entry.name, {})[entry.version] = entry
        self._changed()

    def _forget(self, entry: ModelEntry) -> None:
        versions = self._entries.get(entry.name, {})
        if versions.get(entry.version) is entry:
            del versions[entry.version]
        if self._rollback.get(entry.name) is entry:
            del self._rollback[entry.name]
        self._changed()

    def _failed(self, entry: ModelEntry, error: str) -> None:
        entry.status.state = "failed"
        entry.status.error = error
        self._load_finished("failed")
        failed = [e for e in self._entries.get(entry.name, {}).values() if e.state == "failed"]
        for old in failed[:-FAILED_KEPT]:
            self._forget(old)
        self._changed()

    def _load_finished(self, outcome: str) -> None:
        if self._observer is not None:
            self._observer.model_load_finished(outcome)

    def _changed(self) -> None:
        if self._observer is None:
            return
        states: dict[str, int] = dict.fromkeys(
            ("loading", "ready", "active", "draining", "failed"), 0
        )
        for entry in self.entries():
            states[entry.state] += 1
        active = [(entry.name, entry.version) for entry in self._active.values()]
        self._observer.models_changed(states, active)

    def _require_started(self) -> None:
        if not self._started:
            raise ModelNotReady(self.not_ready_reason)

    @contextlib.contextmanager
    def _claim(self, name: str, what: str) -> Iterator[_Claim]:
        """Hold the name's admin slot for this operation; refused while another holds it."""
        if (running := self._busy.get(name)) is not None:
            raise AdminConflict(f"model {name!r} is busy ({running}); retry when it is done")
        self._busy[name] = what
        claim = _Claim(self._busy, name)
        try:
            yield claim
        finally:
            if not claim.kept:
                claim.release()


class _Claim:
    """A name's admin slot; ``keep`` hands it to a background task, which releases it."""

    def __init__(self, busy: dict[str, str], name: str) -> None:
        self._busy, self._name = busy, name
        self.kept = False

    def keep(self) -> None:
        self.kept = True

    def hand_to(self, task: asyncio.Task[Any]) -> None:
        """Keep the slot until ``task`` ends."""
        self.keep()
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.release()
        if not task.cancelled():
            task.exception()  # retrieved: a caller that went away does not read it

    def release(self) -> None:
        self._busy.pop(self._name, None)
