"""The model registry (issue 10, DESIGN.md 4) on its own, with fake engines: leases, loads,
atomic activation, draining, rollback targets and the per-name admin slot.

Gates (``asyncio.Event``) hold a load, a score call or an activation hook where a test needs
it; nothing waits for time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from service.scoring.batcher import DeviceHealth
from service.scoring.registry import (
    FAILED_KEPT,
    ActivationFailed,
    AdminConflict,
    ModelEntry,
    ModelNotReady,
    ModelRegistry,
    ModelSpec,
    UnknownModel,
    UnknownVersion,
    VersionNotLoaded,
)
from service.scoring.types import ModelLoadError, RewardInput
from tests.unit.fake_engine import FakeEngines, FakeModel, fake_version
from tests.unit.test_api import run, until

OLD = Path("/m/old")
NEW = Path("/m/new")
THIRD = Path("/m/third")
NAME = "rm"
ITEM = RewardInput(prompt="P", response="abcd")  # the fake's reward: 0.4 plus the offset


class Recorder:
    """A ``RegistryObserver`` that keeps what it was told."""

    def __init__(self) -> None:
        self.states: list[dict[str, int]] = []
        self.active: list[list[tuple[str, str]]] = []
        self.loads: list[str] = []
        self.swaps = 0

    def models_changed(self, states: Mapping[str, int], active: Sequence[tuple[str, str]]) -> None:
        self.states.append(dict(states))
        self.active.append(list(active))

    def model_load_finished(self, outcome: str) -> None:
        self.loads.append(outcome)

    def model_swapped(self) -> None:
        self.swaps += 1


def version(path: Path, name: str = NAME) -> str:
    return fake_version(name, path)


def engines() -> FakeEngines:
    """A factory whose engines of OLD, NEW and THIRD score 0, 10 and 20 apart."""
    factory = FakeEngines()
    for path, offset in ((OLD, 0.0), (NEW, 10.0), (THIRD, 20.0)):
        factory.models[path] = FakeModel(reward_offset=offset)
    return factory


async def started(
    factory: FakeEngines,
    *,
    drain_timeout_s: float = 30.0,
    drain_idle_s: float = 0.0,
    keep_previous: bool = False,
) -> tuple[ModelRegistry, Recorder]:
    """A registry serving OLD as ``rm``."""
    recorder = Recorder()
    registry = ModelRegistry(
        factory,
        drain_timeout_s=drain_timeout_s,
        drain_idle_s=drain_idle_s,
        keep_previous=keep_previous,
        observer=recorder,
    )
    await registry.start([ModelSpec(path=OLD, name=NAME)])
    return registry, recorder


async def loaded(registry: ModelRegistry, path: Path, *, activate: bool = False) -> ModelEntry:
    """Load ``path`` under ``rm`` and wait for the load (and activation) to end."""
    entry = await registry.load(
        ModelSpec(path=path, name=NAME), activate=activate, before_activate=None
    )
    await until(lambda: entry.state != "loading" and not (activate and entry.state == "ready"))
    return entry


def active_version(registry: ModelRegistry, name: str = NAME) -> str | None:
    entry = registry.active(name)
    return entry.version if entry else None


async def settle() -> None:
    """Give every ready task on the loop a few turns (no time passes): what a background task
    would do at once, it has done when this returns."""
    for _ in range(20):
        await asyncio.sleep(0)


async def reward_of(registry: ModelRegistry, version: str | None = None) -> float:
    with registry.lease(NAME, version) as lease:
        [score] = await lease.score([ITEM], truncation="none")
    return score.reward


# --- start and leases -------------------------------------------------------------------------


def test_start_activates_the_configured_models_in_order() -> None:
    async def body() -> None:
        factory = FakeEngines()
        registry = ModelRegistry(factory, drain_timeout_s=30.0)
        assert not registry.ready
        with pytest.raises(ModelNotReady):
            registry.lease()
        await registry.start([ModelSpec(path=OLD, name="help"), ModelSpec(path=NEW, name="harm")])
        assert registry.ready
        assert registry.names == ["help", "harm"]
        assert registry.default_name == "help"
        assert [(e.name, e.version, e.state) for e in registry.entries()] == [
            ("help", version(OLD, "help"), "active"),
            ("harm", version(NEW, "harm"), "active"),
        ]
        assert registry.lease().version == version(OLD, "help")
        assert registry.lease("harm").version == version(NEW, "harm")
        # Configured models start without the full-size warm batch; admin loads have it.
        assert [engine.full_warm_ups for engine in factory.built] == [0, 0]

    run(body())


def test_a_lease_counts_while_held() -> None:
    async def body() -> None:
        registry, _ = await started(engines())
        entry = registry.active()
        assert entry is not None
        with registry.lease() as lease:
            assert lease.entry is entry
            assert (lease.name, lease.version) == (NAME, version(OLD))
            assert entry.status.in_flight == 1
            assert not entry.status.idle.is_set()
        assert entry.status.in_flight == 0
        assert entry.status.idle.is_set()

    run(body())


def test_pins_name_unknown_models_and_versions_not_loaded() -> None:
    async def body() -> None:
        registry, _ = await started(engines())
        ready = await loaded(registry, NEW)
        assert ready.state == "ready"
        assert await reward_of(registry, version(OLD)) == pytest.approx(0.4)
        # A ready version does not serve pins before it is active; an unknown one never.
        for pinned in (version(NEW), "rm@ffffffffffff"):
            with pytest.raises(VersionNotLoaded) as refused:
                registry.lease(NAME, pinned)
            assert refused.value.requested == pinned
            assert refused.value.active == version(OLD)
            assert refused.value.loaded == [version(OLD)]
        assert ready.status.in_flight == 0
        with pytest.raises(UnknownModel) as unknown:
            registry.lease("harm")
        assert unknown.value.known == [NAME]
        with pytest.raises(UnknownVersion):
            registry.find("rm@ffffffffffff")

    run(body())


def test_start_failure_is_the_not_ready_reason() -> None:
    async def body() -> None:
        factory = FakeEngines({OLD: FakeModel(fail_load="out of memory")})
        registry = ModelRegistry(factory, drain_timeout_s=30.0)
        with pytest.raises(RuntimeError, match="out of memory"):
            await registry.start([ModelSpec(path=OLD, name=NAME)])
        assert not registry.ready
        assert registry.not_ready_reason == "model load failed: out of memory"
        with pytest.raises(ModelNotReady):
            registry.lease()

    run(body())


def test_two_configured_models_of_one_name_are_refused() -> None:
    async def body() -> None:
        registry = ModelRegistry(FakeEngines(), drain_timeout_s=30.0)
        specs = [ModelSpec(path=OLD, name=NAME), ModelSpec(path=NEW, name=NAME)]
        with pytest.raises(AdminConflict, match="two configured models"):
            await registry.start(specs)

    run(body())


# --- loads --------------------------------------------------------------------------------------


def test_a_load_warms_with_a_full_batch_and_leaves_the_active_version_alone() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = gate
        registry, recorder = await started(factory)
        entry = await registry.load(
            ModelSpec(path=NEW, name=NAME), activate=False, before_activate=None
        )
        assert (entry.version, entry.state) == (version(NEW), "loading")
        await until(lambda: factory.last(NEW).starts == 1)
        assert entry.state == "loading"
        assert active_version(registry) == version(OLD)
        gate.set()
        await until(lambda: entry.state == "ready")
        assert factory.last(NEW).full_warm_ups == 1
        assert entry.status.loaded_at is not None
        assert active_version(registry) == version(OLD)
        assert recorder.loads == ["ready", "ready"]  # the configured one, then this one

    run(body())


def test_a_failed_load_is_listed_with_its_reason_and_may_be_loaded_again() -> None:
    async def body() -> None:
        factory = engines()
        factory.models[NEW].fail_load = "CUDA out of memory"
        registry, recorder = await started(factory)
        failed = await loaded(registry, NEW)
        assert failed.state == "failed"
        assert failed.status.error == "CUDA out of memory"
        assert factory.last(NEW).stops == 1  # whatever it loaded went back
        assert await reward_of(registry) == pytest.approx(0.4)
        assert recorder.loads[-1] == "failed"
        # Fixed on disk, the same directory loads again: the failed entry is replaced.
        factory.models[NEW].fail_load = None
        again = await loaded(registry, NEW)
        assert again is not failed
        assert again.state == "ready"
        assert [e.version for e in registry.entries()] == [version(OLD), version(NEW)]

    run(body())


def test_a_load_builds_its_engine_with_the_spec_it_was_given() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory)
        await registry.load(
            ModelSpec(path=NEW, label_index=2), activate=False, before_activate=None
        )
        # No name: it serves under the default model's, so that a load is a swap.
        assert factory.specs[-1] == ModelSpec(path=NEW, name=NAME, label_index=2)

    run(body())


def test_failed_loads_kept_are_bounded() -> None:
    async def body() -> None:
        factory = engines()
        paths = [Path(f"/m/broken-{i}") for i in range(FAILED_KEPT + 3)]
        for path in paths:
            factory.models[path] = FakeModel(fail_load=f"{path} is broken")
        registry, _ = await started(factory)
        for path in paths:
            await loaded(registry, path)
        failed = [e.version for e in registry.entries() if e.state == "failed"]
        assert failed == [version(path) for path in paths[-FAILED_KEPT:]]

    run(body())


def test_a_directory_that_cannot_be_identified_frees_its_engine_and_the_name() -> None:
    async def body() -> None:
        factory = engines()
        factory.models[THIRD] = FakeModel(unidentifiable="no config.json in /m/third")
        registry, _ = await started(factory)
        with pytest.raises(ModelLoadError, match=r"no config\.json"):
            await registry.load(
                ModelSpec(path=THIRD, name=NAME), activate=False, before_activate=None
            )
        assert factory.last(THIRD).stops == 1
        assert [e.version for e in registry.entries()] == [version(OLD)]
        assert (await loaded(registry, NEW)).state == "ready"  # the name is not busy

    run(body())


def test_a_version_already_held_is_refused_and_its_new_engine_released() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory)
        with pytest.raises(AdminConflict, match="already active"):
            await registry.load(
                ModelSpec(path=OLD, name=NAME), activate=False, before_activate=None
            )
        first, refused = factory.built
        assert refused.stops == 1  # identified, never started: nothing of it stays
        assert first.stops == 0
        assert (await loaded(registry, NEW)).state == "ready"

    run(body())


def test_admin_operations_on_a_name_are_refused_while_a_load_runs() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = gate
        registry, _ = await started(factory)
        entry = await registry.load(
            ModelSpec(path=NEW, name=NAME), activate=False, before_activate=None
        )
        with pytest.raises(AdminConflict, match="busy"):
            await registry.load(
                ModelSpec(path=THIRD, name=NAME), activate=False, before_activate=None
            )
        with pytest.raises(AdminConflict):
            await registry.activate(entry.version, None)
        # Activating the active version asks nothing of the name: answered at once.
        done = await registry.activate(version(OLD), None)
        assert (done.changed, done.previous) == (False, version(OLD))
        gate.set()
        await until(lambda: entry.state == "ready")
        assert (await loaded(registry, THIRD)).state == "ready"  # the slot is free again

    run(body())


def test_unloading_a_loading_version_cancels_its_load() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = gate
        registry, recorder = await started(factory)
        entry = await registry.load(
            ModelSpec(path=NEW, name=NAME), activate=True, before_activate=None
        )
        await until(lambda: factory.last(NEW).starts == 1)
        assert await registry.unload(entry.version) is entry
        assert factory.last(NEW).stops == 1
        assert [e.version for e in registry.entries()] == [version(OLD)]
        assert recorder.loads[-1] == "cancelled"
        gate.set()
        await settle()
        assert active_version(registry) == version(OLD)
        assert (await loaded(registry, THIRD)).state == "ready"  # the name is not busy

    run(body())


def test_unload_refuses_the_active_and_unknown_versions_and_frees_a_ready_one() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory)
        with pytest.raises(AdminConflict, match="is active"):
            await registry.unload(version(OLD))
        with pytest.raises(UnknownVersion):
            await registry.unload("rm@ffffffffffff")
        entry = await loaded(registry, NEW)
        await registry.unload(entry.version)
        assert factory.last(NEW).stops == 1
        assert [e.version for e in registry.entries()] == [version(OLD)]
        with pytest.raises(VersionNotLoaded):
            registry.lease(NAME, entry.version)

    run(body())


# --- activation and draining ------------------------------------------------------------------


def test_a_lease_taken_before_a_swap_finishes_on_the_old_version_which_then_unloads() -> None:
    async def body() -> None:
        factory = engines()
        registry, recorder = await started(factory)
        old = registry.active()
        assert old is not None
        new = await loaded(registry, NEW)
        with registry.lease() as held:
            done = await registry.activate(new.version, None)
            assert (done.previous, done.changed) == (version(OLD), True)
            assert registry.active() is new
            assert new.status.activated_at is not None
            assert await reward_of(registry) == pytest.approx(10.4)
            await settle()
            assert old.state == "draining"
            assert factory.last(OLD).stops == 0
            # Pinned to the draining version: still served by it.
            assert await reward_of(registry, version(OLD)) == pytest.approx(0.4)
            [score] = await held.score([ITEM], truncation="none")
            assert score.reward == pytest.approx(0.4)
            assert held.version == version(OLD)
        await until(lambda: factory.last(OLD).stops == 1)
        assert [e.version for e in registry.entries()] == [version(NEW)]
        assert recorder.swaps == 1
        assert recorder.active[-1] == [(NAME, version(NEW))]
        with pytest.raises(VersionNotLoaded) as refused:
            registry.lease(NAME, version(OLD))
        assert refused.value.active == version(NEW)

    run(body())


def test_a_drained_version_lingers_for_the_rest_of_a_call_pinned_to_it() -> None:
    """The last request on the old version ended; the next chunk of its call, pinned to it,
    comes a moment later and is still served (the linger is far longer than the test)."""

    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory, drain_idle_s=60.0)
        old = registry.active()
        assert old is not None
        new = await loaded(registry, NEW)
        with registry.lease():  # the first chunk, answered before the swap ends
            await registry.activate(new.version, None)
        await settle()
        assert old.state == "draining"
        assert await reward_of(registry, version(OLD)) == pytest.approx(0.4)
        await settle()
        assert (old.state, factory.last(OLD).stops) == ("draining", 0)
        await registry.astop()

    run(body())


def test_a_drained_version_is_unloaded_once_unused_for_the_linger() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory, drain_idle_s=0.05)
        new = await loaded(registry, NEW)
        with registry.lease():
            await registry.activate(new.version, None)
        assert await reward_of(registry, version(OLD)) == pytest.approx(0.4)
        await until(lambda: factory.last(OLD).stops == 1)
        assert [e.version for e in registry.entries()] == [version(NEW)]

    run(body())


def test_a_drained_version_whose_release_fails_is_gone_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory)
        old_engine = factory.last(OLD)

        async def broken_stop() -> None:
            raise RuntimeError("device lost")

        old_engine.astop = broken_stop  # type: ignore[method-assign]
        new = await loaded(registry, NEW)
        await registry.activate(new.version, None)
        await until(lambda: [e.version for e in registry.entries()] == [version(NEW)])
        await until(lambda: "releasing its engine failed" in caplog.text)
        assert await reward_of(registry) == pytest.approx(10.4)

    run(body())


def test_a_drain_that_outlasts_its_timeout_unloads_anyway() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory, drain_timeout_s=0.0)
        new = await loaded(registry, NEW)
        with registry.lease():  # a request that never ends
            await registry.activate(new.version, None)
            await until(lambda: factory.last(OLD).stops == 1)
        assert [e.version for e in registry.entries()] == [version(NEW)]

    run(body())


def test_activation_refuses_unknown_failed_and_draining_versions() -> None:
    async def body() -> None:
        factory = engines()
        factory.models[THIRD].fail_load = "bad config"
        registry, _ = await started(factory)
        with pytest.raises(UnknownVersion):
            await registry.activate("rm@ffffffffffff", None)
        failed = await loaded(registry, THIRD)
        with pytest.raises(AdminConflict, match="is failed"):
            await registry.activate(failed.version, None)
        new = await loaded(registry, NEW)
        with registry.lease():
            await registry.activate(new.version, None)
            with pytest.raises(AdminConflict, match="is draining"):
                await registry.activate(version(OLD), None)
            with pytest.raises(AdminConflict, match="is draining"):
                await registry.unload(version(OLD))

    run(body())


def test_a_failing_hook_refuses_the_activation_and_the_previous_stays_active() -> None:
    async def body() -> None:
        factory = engines()
        registry, recorder = await started(factory)
        new = await loaded(registry, NEW)

        async def rebaseline(entry: ModelEntry) -> None:
            raise RuntimeError("the baseline store is down")

        with pytest.raises(ActivationFailed, match="the baseline store is down"):
            await registry.activate(new.version, rebaseline)
        assert active_version(registry) == version(OLD)
        assert new.state == "ready"
        assert new.status.error == "activation failed: the baseline store is down"
        assert recorder.swaps == 0
        # A later activation that works clears the error.
        await registry.activate(new.version, None)
        assert new.status.state == "active"
        assert new.status.error is None

    run(body())


def test_the_hook_scores_with_the_version_it_activates_while_the_old_one_serves() -> None:
    async def body() -> None:
        registry, _ = await started(engines())
        new = await loaded(registry, NEW)
        seen: list[tuple[str | None, float]] = []

        async def rebaseline(entry: ModelEntry) -> None:
            active = registry.active()
            with registry.lease_of(entry) as lease:
                [score] = await lease.score([ITEM], truncation="left")
            seen.append((active.version if active else None, score.reward))

        await registry.activate(new.version, rebaseline)
        [(active_then, reward)] = seen
        assert active_then == version(OLD)
        assert reward == pytest.approx(10.4)
        assert registry.active() is new

    run(body())


def test_an_activation_goes_on_when_its_caller_is_cancelled_and_holds_the_name() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory)
        new = await loaded(registry, NEW)
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow_rebaseline(entry: ModelEntry) -> None:
            entered.set()
            await release.wait()

        caller = asyncio.create_task(registry.activate(new.version, slow_rebaseline))
        await entered.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        # The activation still runs: a second admin operation on the name is refused.
        with pytest.raises(AdminConflict, match="busy"):
            await registry.load(
                ModelSpec(path=THIRD, name=NAME), activate=False, before_activate=None
            )
        assert active_version(registry) == version(OLD)
        release.set()
        await until(lambda: registry.active() is new)
        await until(lambda: factory.last(OLD).stops == 1)
        assert (await loaded(registry, THIRD)).state == "ready"

    run(body())


def test_a_load_with_activate_swaps_once_it_is_ready() -> None:
    async def body() -> None:
        factory = engines()
        registry, recorder = await started(factory)
        order: list[str] = []

        async def hook(entry: ModelEntry) -> None:
            order.append(f"hook {entry.state}")

        entry = await registry.load(
            ModelSpec(path=NEW, name=NAME), activate=True, before_activate=hook
        )
        await until(lambda: registry.active() is entry)
        assert order == ["hook ready"]
        await until(lambda: factory.last(OLD).stops == 1)
        assert recorder.swaps == 1

    run(body())


def test_keep_previous_keeps_one_rollback_target() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory, keep_previous=True)
        old = registry.active()
        assert old is not None
        new = await loaded(registry, NEW, activate=True)
        assert new.state == "active"
        await until(lambda: old.state == "ready")
        assert factory.last(OLD).stops == 0
        # Rollback: the previous version is active again, the other one kept in its place.
        done = await registry.activate(old.version, None)
        assert (done.previous, done.changed) == (version(NEW), True)
        await until(lambda: new.state == "ready")
        assert await reward_of(registry) == pytest.approx(0.4)
        assert [e.state for e in registry.entries()] == ["active", "ready"]
        # A third version: the one it replaces is kept, the older target goes.
        third = await loaded(registry, THIRD, activate=True)
        assert third.state == "active"
        await until(lambda: old.state == "ready" and factory.last(NEW).stops == 1)
        assert {e.version: e.state for e in registry.entries()} == {
            version(OLD): "ready",
            version(THIRD): "active",
        }
        assert factory.last(OLD).stops == 0

    run(body())


def test_device_health_sums_the_versions_that_serve() -> None:
    async def body() -> None:
        factory = engines()
        factory.models[THIRD].fail_load = "bad config"
        registry, _ = await started(factory)
        await loaded(registry, NEW)
        await loaded(registry, THIRD)
        factory.last(NEW).devices = DeviceHealth(started=2, alive=1, died=1)
        health = registry.device_health
        assert (health.started, health.alive, health.died) == (3, 2, 1)

    run(body())


def test_stop_cancels_loads_and_stops_every_engine() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        factory = engines()
        factory.models[NEW].load_gate = gate
        registry, _ = await started(factory)
        await registry.load(ModelSpec(path=NEW, name=NAME), activate=True, before_activate=None)
        await until(lambda: factory.last(NEW).starts == 1)
        await registry.astop()
        assert [engine.stops for engine in factory.built] == [1, 1]
        assert registry.active() is None

    run(body())


def test_stop_cancels_an_activation_waiting_on_its_rebaseline() -> None:
    async def body() -> None:
        factory = engines()
        registry, _ = await started(factory)
        new = await loaded(registry, NEW)
        entered, cancelled = asyncio.Event(), asyncio.Event()

        async def endless_rebaseline(entry: ModelEntry) -> None:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        caller = asyncio.create_task(registry.activate(new.version, endless_rebaseline))
        await entered.wait()
        async with asyncio.timeout(5):  # a bound, not a pause: stop must not wait on the pass
            await registry.astop()
        assert cancelled.is_set()
        assert [engine.stops for engine in factory.built] == [1, 1]
        with pytest.raises(asyncio.CancelledError):
            await caller

    run(body())


def test_observer_sees_states_loads_and_swaps() -> None:
    async def body() -> None:
        factory = engines()
        registry, recorder = await started(factory)
        assert recorder.states[-1] == {
            "loading": 0,
            "ready": 0,
            "active": 1,
            "draining": 0,
            "failed": 0,
        }
        await loaded(registry, NEW, activate=True)
        await until(lambda: factory.last(OLD).stops == 1)
        assert recorder.states[-1]["active"] == 1
        assert sum(recorder.states[-1].values()) == 1
        assert recorder.active[-1] == [(NAME, version(NEW))]
        assert recorder.loads == ["ready", "ready"]
        assert recorder.swaps == 1

    run(body())
