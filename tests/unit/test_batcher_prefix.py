"""The batcher with prompt-prefix grouping, on a stand-in forward: items of one prompt from
separate requests run together, the shared prompt counted once, groups taken whole and nearest
in prompt length first,
the prompt index kept in step with the queue. Torch-free (it also runs on Python 3.12)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.scoring.batcher import Batcher, QueueTimeout
from service.scoring.grouping import EXPANDED_CACHE_FACTOR, GroupedCost
from service.scoring.types import Encoded
from tests.unit.test_batcher import Model, Observer, hold_device, until_queued
from tests.unit.test_batcher import running as batcher_running

# Prompt n's tokens are PROMPT_BASE * (n + 1) + position; tags (an item's first own token)
# stay below PROMPT_BASE, so items of one prompt share exactly the prompt.
PROMPT_BASE = 10_000
HELD_TAG = 7  # what hold_device submits: encoded(4, tag=7)


def reward(item: Encoded) -> float:
    """What the stand-in model answers: a function of the item's tokens alone, different for
    the items of one test (a rolling hash, exact as a float)."""
    value = 0
    for token in item.input_ids:
        value = (value * 1_000_003 + token) % 2_147_483_647
    return float(value)


class PromptModel(Model):
    """test_batcher's held, recording stand-in, answering ``reward``."""

    def forward(self, batch: Sequence[Encoded]) -> list[float]:
        self.entered.set()
        self.gate.wait(timeout=10)
        self.batches.append(list(batch))
        return [reward(item) for item in batch]

    def after_held(self) -> list[list[Encoded]]:
        """The batches after hold_device's."""
        assert [item.input_ids[0] for item in self.batches[0]] == [HELD_TAG]
        return self.batches[1:]


def prompted(prompt: int, prompt_len: int, own_len: int, tag: int) -> Encoded:
    """An item of prompt ``prompt``: its ``prompt_len`` tokens, then ``own_len`` of its own,
    the first of them ``tag``."""
    ids = [PROMPT_BASE * (prompt + 1) + i for i in range(prompt_len)]
    return Encoded(
        input_ids=ids + [tag] + [1] * (own_len - 1),
        token_type_ids=None,
        truncated=False,
        prefix_key=f"prompt-{prompt}",
    )


def plain(length: int, tag: int) -> Encoded:
    return Encoded(input_ids=[tag] + [1] * (length - 1), token_type_ids=None, truncated=False)


def keyless(item: Encoded) -> Encoded:
    return Encoded(input_ids=item.input_ids, token_type_ids=None, truncated=False)


def running(
    model: Model, *, budget: int, group_prefixes: bool = True, workers: int = 1
) -> contextlib.AbstractAsyncContextManager[tuple[Batcher, Observer]]:
    """test_batcher's running batcher, grouping by prompt unless told not to."""
    return batcher_running(
        model, budget=budget, queue=1_000_000, workers=workers, group_prefixes=group_prefixes
    )


async def run_held(
    items: Sequence[Encoded], *, budget: int, group_prefixes: bool = True
) -> list[list[Encoded]]:
    """Submit each item as a request of its own while the device is held, then let it go;
    every request gets its reward. Returns the batches after the held one."""
    model = PromptModel()
    async with running(model, budget=budget, group_prefixes=group_prefixes) as (batcher, _):
        held = await hold_device(batcher, model)
        tasks = [asyncio.ensure_future(batcher.submit([item], 10)) for item in items]
        await until_queued(batcher, sum(item.length for item in items))
        model.gate.set()
        assert await asyncio.gather(*tasks) == [[reward(item)] for item in items]
        await held
        assert batcher._by_prefix == {}
    return model.after_held()


def grouped_cost_fits(batch: Sequence[Encoded], budget: int) -> bool:
    cost = GroupedCost(budget)
    for item in batch:
        cost.add(item)
    total = cost.cost()
    return total.computed <= budget and total.expanded <= EXPANDED_CACHE_FACTOR * budget


def forward_fits(batch: Sequence[Encoded], budget: int) -> bool:
    """Whether the forward stays within the budget: it groups a batch only where that computes
    fewer tokens than the full forward (``prefix.pays``), so one of the two must fit."""
    padded = len(batch) * max(item.length for item in batch)
    return padded <= budget or grouped_cost_fits(batch, budget)


# A queue where prompt 0's items (32 and 70 tokens, sharing 30) arrive apart, with keyless
# items of lengths in between; a 150-token budget.
A1, A2 = prompted(0, 30, 2, tag=11), prompted(0, 30, 40, tag=12)
K40, K45, K50, K60 = plain(40, 13), plain(45, 14), plain(50, 15), plain(60, 16)
INTERLEAVED = [A1, K40, K45, A2, K50, K60]


@pytest.mark.parametrize(
    ("group_prefixes", "expected"),
    [
        # The prompt's items together (30 + 2 * 40 tokens), then windows of the rest.
        (True, [[A1, A2], [K40, K45, K50], [K60]]),
        # The length-sorted window around the oldest item (A1) ends before A2.
        (False, [[A1, K40, K45], [K60, A2], [K50]]),
    ],
)
def test_one_prompts_items_from_separate_requests_run_in_one_batch(
    group_prefixes: bool, expected: list[list[Encoded]]
) -> None:
    batches = asyncio.run(run_held(INTERLEAVED, budget=150, group_prefixes=group_prefixes))
    assert batches == expected


@pytest.mark.parametrize(
    "items",
    [
        INTERLEAVED,
        [prompted(n % 3, 20 + 5 * (n % 3), 1 + n % 7, tag=20 + n) for n in range(12)],
        [prompted(0, 25, 3, 20), plain(26, 21), prompted(1, 22, 4, 22), prompted(0, 25, 9, 23)],
    ],
)
def test_without_grouping_keys_change_nothing(items: list[Encoded]) -> None:
    """With group_prefixes off, keyed items form the same windows as keyless ones; with it on,
    keyless items form those windows too."""
    off = asyncio.run(run_held(items, budget=120, group_prefixes=False))
    stripped = [keyless(item) for item in items]
    on_without_keys = asyncio.run(run_held(stripped, budget=120, group_prefixes=True))
    assert [[keyless(item) for item in batch] for batch in off] == on_without_keys


@pytest.mark.parametrize(
    ("members", "grouped_sizes", "windowed_sizes"),
    [
        # 40 + 6 * 5 = 70 computed tokens, where 6 rows of 45 pad to 270 > 150.
        (6, [6], [3, 3]),
        # The 8th member would hold 8 * 40 = 320 > 2 * 150 prefix tokens in the cache.
        (9, [7, 2], [3, 3, 3]),
    ],
)
def test_the_prompt_counted_once_lets_more_items_into_a_batch(
    members: int, grouped_sizes: list[int], windowed_sizes: list[int]
) -> None:
    items = [prompted(0, 40, 5, tag=20 + n) for n in range(members)]
    grouped = asyncio.run(run_held(items, budget=150, group_prefixes=True))
    assert [len(batch) for batch in grouped] == grouped_sizes
    assert [item for batch in grouped for item in batch] == items  # in arrival order
    assert len(grouped[0]) * 45 > 150
    assert all(grouped_cost_fits(batch, 150) for batch in grouped)
    windowed = asyncio.run(run_held(items, budget=150, group_prefixes=False))
    assert [len(batch) for batch in windowed] == windowed_sizes


# A queue of three prompts, in arrival order: A (30 tokens), C (20) and B (25); the oldest of C
# arrives before the oldest of B; within A the later item is the shorter one.
GA1, GA2 = prompted(0, 30, 15, tag=31), prompted(0, 30, 3, tag=32)
GC1, GC2 = prompted(2, 20, 30, tag=33), prompted(2, 20, 2, tag=34)
GB1, GB2 = prompted(1, 25, 1, tag=35), prompted(1, 25, 1, tag=36)
LONE = prompted(3, 18, 4, tag=37)
K10 = plain(10, 38)
GROUPS_QUEUE = [GA1, GC1, GB1, GB2, K10, GC2, LONE, GA2]


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        # Everything grouped fits: the anchor's group, then B (25 tokens from A's 30), then C
        # (20), though C's oldest arrived first; the keyless item and the lone keyed one are
        # left to a window.
        (10_000, [[GA1, GA2, GB1, GB2, GC1, GC2], [K10, LONE]]),
        # A and B cost 2 * 30 + 4 * 15 = 120. C1 alone would fit beside them (in full, 50),
        # but C whole does not (3 * 30 + 6 * 30 = 270 > 200): C waits for a batch of its own.
        (200, [[GA1, GA2, GB1, GB2], [GC1, GC2], [K10, LONE]]),
    ],
)
def test_groups_are_taken_whole_and_nearest_in_prompt_length_first(
    budget: int, expected: list[list[Encoded]]
) -> None:
    assert asyncio.run(run_held(GROUPS_QUEUE, budget=budget)) == expected


def test_a_lone_keyed_item_runs_in_a_window() -> None:
    lone, other = prompted(0, 20, 10, tag=40), prompted(1, 20, 3, tag=41)
    items = [lone, plain(28, 42), plain(35, 43), other]
    batches = asyncio.run(run_held(items, budget=1000))
    assert batches == [[other, plain(28, 42), lone, plain(35, 43)]]


def test_items_a_window_ran_leave_the_prompt_index() -> None:
    # The oldest item is keyless: its window takes two of prompt 0's items. Prompt 1's pair is
    # grouped next; prompt 0 has one item left (a3), so it is no group to join them, unless
    # the index still held the two that ran.
    first, a1, a2 = plain(30, 50), prompted(0, 20, 11, tag=51), prompted(0, 20, 12, tag=52)
    b1, b2 = prompted(1, 60, 10, tag=53), prompted(1, 60, 11, tag=54)
    a3 = prompted(0, 20, 60, tag=55)
    # 200: the window stops short of 4 * 70 padded; prompt 1's pair costs 60 + 2 * 11.
    batches = asyncio.run(run_held([first, a1, a2, b1, b2, a3], budget=200))
    assert batches == [[first, a1, a2], [b1, b2], [a3]]


@pytest.mark.parametrize("reason", ["cancelled", "timeout"])
def test_a_dropped_request_leaves_the_prompt_index_in_step(reason: str) -> None:
    gone = [prompted(0, 25, 3, tag=60), prompted(0, 25, 4, tag=61), prompted(1, 20, 2, tag=62)]
    a3, a4 = prompted(0, 25, 5, tag=63), prompted(0, 25, 6, tag=64)
    b2, k = prompted(1, 20, 7, tag=65), plain(12, 66)
    staying = [a3, a4, b2, k]

    async def body() -> list[list[Encoded]]:
        model = PromptModel()
        async with running(model, budget=1000) as (batcher, observer):
            held = await hold_device(batcher, model)
            dropped = asyncio.ensure_future(
                batcher.submit(gone, 0.05 if reason == "timeout" else 10)
            )
            tasks = [asyncio.ensure_future(batcher.submit([item], 10)) for item in staying]
            await until_queued(batcher, sum(item.length for item in gone + staying))
            if reason == "timeout":
                with pytest.raises(QueueTimeout):
                    await dropped
            else:
                dropped.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dropped
                assert dropped.cancelled()
            assert batcher.queued_tokens == sum(item.length for item in staying)
            model.gate.set()
            assert await asyncio.gather(*tasks) == [[reward(item)] for item in staying]
            await held
            assert batcher._by_prefix == {}
        assert observer.dropped == Counter({reason: 3})
        return model.after_held()

    batches = asyncio.run(body())
    # Prompt 0 is left with a3 and a4 (its oldest item gone), prompt 1 with b2 alone.
    assert batches == [[a3, a4], [k, b2]]


def test_a_window_with_two_prompts_stays_within_the_budget_as_the_forward_runs_it() -> None:
    # All 41 tokens: the oldest keyless, prompt 0's two sharing 40, prompt 1's sharing 16.
    # Padded 5 * 41 = 205; grouped 2 * 40 (prefixes) + 4 * 25 (own parts) + 41 = 221.
    items = [
        plain(41, 70),
        prompted(0, 40, 1, tag=71),
        prompted(0, 40, 1, tag=72),
        prompted(1, 16, 25, tag=73),
        prompted(1, 16, 25, tag=74),
    ]
    batches = asyncio.run(run_held(items, budget=205))
    assert batches == [items]  # one window, padded to exactly the budget
    # Grouped it would compute more than the budget; the forward then runs it in full.
    assert not grouped_cost_fits(items, 205)
    assert forward_fits(items, 205)


# A request: its items, each (prompt number or None for a keyless item, own length).
requests_strategy = st.lists(
    st.lists(st.tuples(st.none() | st.integers(0, 3), st.integers(1, 30)), min_size=1, max_size=6),
    min_size=1,
    max_size=8,
)


@settings(deadline=None, max_examples=25)
@given(
    requests_strategy,
    st.lists(st.integers(16, 40), min_size=4, max_size=4),
    st.integers(64, 600),
    st.integers(1, 2),
)
def test_every_request_gets_its_rewards_and_batches_keep_the_budget(
    requests: list[list[tuple[int | None, int]]],
    prompt_lens: list[int],
    budget: int,
    workers: int,
) -> None:
    tags = iter(range(2, PROMPT_BASE))
    submissions = [
        [
            plain(prompt_lens[0] + own, next(tags))
            if prompt is None
            else prompted(prompt, prompt_lens[prompt], own, next(tags))
            for prompt, own in spec
        ]
        for spec in requests
    ]

    model = PromptModel()

    async def body() -> list[list[float]]:
        async with running(model, budget=budget, workers=workers) as (batcher, _):
            got = await asyncio.gather(*(batcher.submit(items, 30) for items in submissions))
            assert batcher._by_prefix == {}
            assert batcher.queued_tokens == 0
        return got

    assert asyncio.run(body()) == [[reward(item) for item in items] for items in submissions]
    # Every item ran exactly once, and no batch of two or more exceeds the budget as the
    # forward computes it (grouped where that is cheaper, else in full).
    ran = Counter(tuple(item.input_ids) for batch in model.batches for item in batch)
    assert ran == Counter(tuple(item.input_ids) for items in submissions for item in items)
    for batch in model.batches:
        assert len(batch) == 1 or forward_fits(batch, budget)


@pytest.mark.parametrize(("workers", "sizes"), [(1, [8]), (2, [2, 2, 4])])
def test_device_threads_share_a_burst_of_prompt_groups(workers: int, sizes: list[int]) -> None:
    """Four prompts' pairs that fit one batch arrive while every device thread is busy: one
    thread takes them all, two take their share of the groups waiting each time (2 of 4, 1 of
    2, then the last), so a GRPO step's burst ends on both at about the same time."""

    async def body() -> list[list[Encoded]]:
        model = PromptModel()
        async with batcher_running(model, budget=10_000, workers=workers, group_prefixes=True) as (
            batcher,
            _,
        ):
            held = [await hold_device(batcher, model) for _ in range(workers)]
            burst = [prompted(p, 30, 3, tag=50 + 2 * p + n) for p in range(4) for n in range(2)]
            tasks = [asyncio.ensure_future(batcher.submit([item], 10)) for item in burst]
            await until_queued(batcher, sum(item.length for item in burst))
            model.gate.set()
            assert await asyncio.gather(*tasks) == [[reward(item)] for item in burst]
            await asyncio.gather(*held)
        return [b for b in model.batches if b[0].input_ids[0] != HELD_TAG]

    batches = asyncio.run(body())
    assert sorted(len(batch) for batch in batches) == sizes
    # Every prompt's pair stays together.
    assert all(len({item.prefix_key for item in batch}) * 2 == len(batch) for batch in batches)
