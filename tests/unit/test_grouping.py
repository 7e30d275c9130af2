"""The cost of a batch whose items sharing a prompt run its tokens once: hand-computed examples,
and agreement with what the forward's own plan (``plan_prefixes``) runs."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.scoring.grouping import (
    EXPANDED_CACHE_FACTOR,
    MIN_PREFIX_TOKENS,
    Cost,
    GroupedCost,
    _shared,
    common_prefix_len,
    shared_tokens,
)
from service.scoring.prefix import plan_prefixes
from service.scoring.types import Encoded

# Generated ids are drawn from 1 up, so no item holds the padding id and every item pools at
# its last token, as GroupedCost assumes.
PAD = 0


def item(ids: Sequence[int], key: str | None = None) -> Encoded:
    return Encoded(input_ids=list(ids), token_type_ids=None, truncated=False, prefix_key=key)


def prompt(length: int, start: int) -> list[int]:
    """A prompt's tokens: ``length`` ids from ``start``, distinct from other prompts'."""
    return list(range(start, start + length))


def own(length: int, tag: int) -> list[int]:
    """An item's own tokens after its prompt: ``tag`` first, so two items with different
    tags share exactly their prompt."""
    return [tag] + [1] * (length - 1)


def cost_of(items: Sequence[Encoded], budget: int = 10_000) -> Cost:
    cost = GroupedCost(budget)
    for entry in items:
        cost.add(entry)
    return cost.cost()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([[1, 2, 3], [1, 2, 3]], 3),
        ([[1, 2, 3], [1, 2]], 2),
        ([[1, 2, 3], [1, 9, 3]], 1),
        ([[5, 2], [1, 2]], 0),
        ([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 7, 4]], 2),
        ([[4, 4], []], 0),
    ],
)
def test_common_prefix_len(rows: list[list[int]], expected: int) -> None:
    assert common_prefix_len(rows) == expected


def test_one_group_runs_its_prompt_once_and_pads_the_own_parts() -> None:
    shared = prompt(20, 100)
    batch = [item(shared + own(n, 2 + i), "a") for i, n in enumerate((3, 5, 9))]
    # One prefix of 20, three own parts padded to 9; each member holds a copy of the prefix.
    assert cost_of(batch) == Cost(computed=20 + 3 * 9, expanded=3 * 20)


def test_two_groups_pad_to_the_longest_prefix_and_the_longest_own_part() -> None:
    a, b = prompt(20, 100), prompt(30, 200)
    batch = [
        item(a + own(2, 2), "a"),
        item(b + own(4, 3), "b"),
        item(a + own(6, 4), "a"),
        item(b + own(4, 5), "b"),
        item(b + own(1, 6), "b"),
    ]
    # Prefixes padded to 30, five own parts padded to 6.
    assert cost_of(batch) == Cost(computed=2 * 30 + 5 * 6, expanded=5 * 30)


def test_keyless_items_run_in_full_beside_a_group() -> None:
    a = prompt(20, 100)
    batch = [
        item(a + own(2, 2), "a"),
        item([7] * 10),
        item(a + own(6, 3), "a"),
        item([8] * 25),
    ]
    assert cost_of(batch) == Cost(computed=20 + 2 * 6 + 2 * 25, expanded=2 * 20)


def test_an_item_with_token_type_ids_runs_in_full_despite_its_key() -> None:
    a = prompt(20, 100)
    pair = Encoded(
        input_ids=a + own(4, 9), token_type_ids=[0] * 24, truncated=False, prefix_key="a"
    )
    batch = [item(a + own(2, 2), "a"), item(a + own(3, 3), "a"), pair]
    assert cost_of(batch) == Cost(computed=20 + 2 * 3 + 1 * 24, expanded=2 * 20)


def test_a_group_of_one_runs_in_full_and_sets_the_plain_width() -> None:
    b = prompt(20, 200)
    batch = [
        item(prompt(30, 100), "alone"),
        item([7] * 10),
        item(b + own(2, 2), "b"),
        item(b + own(3, 3), "b"),
    ]
    # The lone item (30) pads the keyless one (10) to its length.
    assert cost_of(batch) == Cost(computed=2 * 30 + (20 + 2 * 3), expanded=2 * 20)


@pytest.mark.parametrize(
    ("shared", "grouped"), [(MIN_PREFIX_TOKENS - 1, False), (MIN_PREFIX_TOKENS, True)]
)
def test_a_group_sharing_less_than_the_minimum_runs_in_full(shared: int, grouped: bool) -> None:
    a = prompt(shared, 100)
    batch = [item(a + own(3, 2), "a"), item(a + own(7, 3), "a")]
    longest = shared + 7
    if grouped:
        assert cost_of(batch) == Cost(computed=shared + 2 * 7, expanded=2 * shared)
    else:
        assert cost_of(batch) == Cost(computed=2 * longest, expanded=0)


def test_every_member_keeps_its_last_token_as_its_own() -> None:
    a = prompt(20, 100)
    # The first item is all prompt: only 19 tokens may be shared, its 20th is where it pools.
    batch = [item(a, "a"), item(a + own(2, 2), "a")]
    assert cost_of(batch) == Cost(computed=19 + 2 * (22 - 19), expanded=2 * 19)


def test_the_expanded_cache_cap_refuses_a_member_the_computed_budget_would_take() -> None:
    budget = 100
    a = prompt(40, 100)
    cost = GroupedCost(budget)
    members = [item(a + own(1, 2 + i), "a") for i in range(6)]
    for member in members[:5]:
        assert cost.fits(member)
        cost.add(member)
    # 5 members hold 5 * 40 = 200 = 2 * budget prefix tokens: the cap, which still fits.
    assert cost.cost() == Cost(computed=40 + 5 * 1, expanded=EXPANDED_CACHE_FACTOR * budget)
    # A sixth would compute 46 tokens only, but hold 240 prefix tokens.
    assert not cost.fits(members[5])


def test_the_computed_budget_refuses_what_would_exceed_it() -> None:
    cost = GroupedCost(50)
    for _ in range(2):
        assert cost.fits(item([7] * 20))
        cost.add(item([7] * 20))
    assert cost.cost().computed == 40
    assert not cost.fits(item([7] * 20))
    # A short item is padded to the longest too: three rows of 20.
    assert not cost.fits(item([7] * 5))


def test_an_empty_batch_takes_an_item_over_the_budget_and_nothing_after_it() -> None:
    cost = GroupedCost(10)
    big = item([7] * 50)
    assert cost.fits(big)
    cost.add(big)
    assert cost.cost() == Cost(computed=50, expanded=0)
    assert not cost.fits(item([7]))


def test_asking_whether_an_item_fits_changes_nothing() -> None:
    a = prompt(30, 100)
    cost = GroupedCost(1000)
    cost.add(item(a + own(2, 2), "a"))
    cost.add(item(a + own(3, 3), "a"))
    before = cost.cost()
    # A mate sharing only 5 tokens would end the group's sharing, were it added.
    assert cost.fits(item(a[:5] + own(30, 4), "a"))
    assert cost.cost() == before
    assert cost.items == 2


def test_the_first_item_over_budget_after_a_fitting_one_is_refused() -> None:
    # The empty-batch rule is for the first item only.
    cost = GroupedCost(10)
    cost.add(item([7] * 4))
    assert not cost.fits(item([7] * 50))


# --- agreement with the forward's plan -----------------------------------------------------


def plan_cost(batch: Sequence[Encoded]) -> Cost:
    """What the forward computes for ``batch``, from ``plan_prefixes``'s own grouping: the
    groups' prefixes padded to the longest, every member's own part padded to the longest,
    and the other items in full, padded to the longest of them."""
    plan = plan_prefixes(batch, PAD)
    members = [(group.prefix_len, batch[i].length) for group in plan.groups for i in group.members]
    prefix = max((group.prefix_len for group in plan.groups), default=0)
    suffix = max((length - shared for shared, length in members), default=0)
    plain_width = max((batch[i].length for i in plan.plain), default=0)
    return Cost(
        computed=len(plan.groups) * prefix + len(members) * suffix + len(plan.plain) * plain_width,
        expanded=len(members) * prefix,
    )


TOKENS = st.integers(1, 12)  # a small alphabet, so items of one prompt often share more
# A first own token no other item has (outside TOKENS), for items of a short prompt.
UNIQUE = 100


@st.composite
def batches(draw: st.DrawFn) -> list[Encoded]:
    """Items of up to four prompts, keyless items, and keyed items with token type ids, in any
    order. An item of a prompt of MIN_PREFIX_TOKENS or more is a cut of it at least that long
    then tokens of its own, so all items of the prompt share its first MIN_PREFIX_TOKENS
    tokens (as plan_prefixes's head check requires to agree); one of a shorter prompt has a
    first own token of its own, so it shares less with every other item."""
    prompts = draw(st.lists(st.lists(TOKENS, min_size=1, max_size=40), max_size=4))
    # Short own parts (with long prompts) are where the expanded cache, not the computed
    # tokens, reaches its cap first.
    own_max = draw(st.sampled_from([2, 20]))
    whole = draw(st.booleans())
    kinds = draw(st.sampled_from([["keyed"], ["keyed", "keyed", "keyed", "keyless", "typed"]]))
    result: list[Encoded] = []
    for index in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(kinds))
        if kind == "keyless" or not prompts:
            result.append(item(draw(st.lists(TOKENS, min_size=1, max_size=60))))
            continue
        key = draw(st.just(0) | st.integers(0, len(prompts) - 1))  # one prompt, often
        shared = prompts[key]
        if len(shared) < MIN_PREFIX_TOKENS:
            ids = shared + [UNIQUE + index] + draw(st.lists(TOKENS, max_size=own_max))
        else:
            # The whole prompt (as the formatter renders it), or a cut of it.
            cut = len(shared) if whole else draw(st.integers(MIN_PREFIX_TOKENS, len(shared)))
            least = 1 if cut == MIN_PREFIX_TOKENS else 0
            ids = shared[:cut] + draw(st.lists(TOKENS, min_size=least, max_size=own_max))
        types = [0] * len(ids) if kind == "typed" else None
        result.append(
            Encoded(input_ids=ids, token_type_ids=types, truncated=False, prefix_key=f"{key}")
        )
    return result


@st.composite
def budgets(draw: st.DrawFn, batch: Sequence[Encoded]) -> int:
    """Any budget, or one at an edge of what a leading part of ``batch`` costs (where a wrong
    comparison shows): of its computed tokens, or of its expanded cache."""
    edge = draw(st.sampled_from(["none", "computed", "expanded"]))
    if not batch or edge == "none":
        return draw(st.integers(1, 200))
    cost = plan_cost(batch[: draw(st.integers(1, len(batch)))])
    if edge == "computed":
        return max(1, draw(st.sampled_from([cost.computed, cost.computed - 1])))
    cap = -(-cost.expanded // EXPANDED_CACHE_FACTOR)  # the least budget that holds the cache
    return max(1, draw(st.sampled_from([cap, cap - 1])))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_cost_is_what_the_forwards_plan_computes(data: st.DataObject) -> None:
    batch = data.draw(batches(), label="batch")
    budget = data.draw(budgets(batch), label="budget")
    cost = GroupedCost(budget)
    for index, entry in enumerate(batch):
        with_it = plan_cost(batch[: index + 1])
        within = with_it.computed <= budget and with_it.expanded <= EXPANDED_CACHE_FACTOR * budget
        assert cost.fits(entry) == (index == 0 or within)
        cost.add(entry)
        assert cost.cost() == with_it
        assert cost.items == index + 1


@given(
    st.lists(st.integers(0, 3), max_size=40),
    st.lists(st.integers(0, 3), max_size=40),
    st.integers(0, 40),
    st.integers(0, 40),
)
def test_shared_is_the_common_prefix_up_to_what_is_known(
    first: list[int], tail: list[int], cut: int, known: int
) -> None:
    other = first[:cut] + tail
    known = min(known, len(first), len(other))
    assert _shared(first, other, known) == min(known, leading_equal(first, other))
    assert shared_tokens(first, other) == leading_equal(first, other)
    assert common_prefix_len([first, other, first]) == leading_equal(first, other)


def leading_equal(first: Sequence[int], other: Sequence[int]) -> int:
    """The reference: equal leading tokens, counted one by one."""
    count = 0
    while count < min(len(first), len(other)) and first[count] == other[count]:
        count += 1
    return count


def test_try_add_adds_what_fits_and_leaves_the_rest_out() -> None:
    cost = GroupedCost(100)
    a, b = item(prompt(40, 1) + own(5, 1), "p"), item(prompt(40, 1) + own(9, 2), "p")
    assert cost.try_add(a)
    assert cost.try_add(b)
    assert cost.cost() == Cost(computed=40 + 2 * 9, expanded=2 * 40)
    before = cost.cost()
    assert not cost.try_add(item(own(60, 3)))  # 58 + 60 would be over 100
    assert cost.cost() == before
    assert cost.items == 2


def test_try_add_all_adds_a_group_whole_or_not_at_all() -> None:
    cost = GroupedCost(150)
    cost.add(item(prompt(40, 1) + own(5, 1), "p"))
    cost.add(item(prompt(40, 1) + own(9, 2), "p"))
    before = cost.cost()  # 40 + 2 * 9 = 58
    # q's first item alone would fit (in full: 58 + 50 = 108); both, grouped, would not:
    # 2 * 40 + 4 * 20 = 160 > 150.
    q = [item(prompt(30, 500) + own(20, n), "q") for n in (1, 2)]
    assert cost.fits(q[0])
    assert not cost.try_add_all(q)
    assert cost.cost() == before
    assert cost.items == 2
    # Two that fit together: r's shared 20 tokens, own parts of 3 and 4.
    r = [item(prompt(20, 900) + own(n, n), "r") for n in (3, 4)]
    assert cost.try_add_all(r)
    assert cost.cost() == Cost(computed=2 * 40 + 4 * 9, expanded=4 * 40)
    assert cost.items == 4


def test_an_empty_batch_takes_a_whole_group_over_the_budget() -> None:
    cost = GroupedCost(10)
    group = [item(prompt(40, 1) + own(5, n), "p") for n in (1, 2)]
    assert cost.try_add_all(group)
    assert cost.items == 2
