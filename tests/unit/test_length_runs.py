"""How a batch (or a grouped batch's members) is split into forwards of similar length:
hand-computed cases, and properties against an exhaustive search on small inputs."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from service.scoring.grouping import MAX_RUNS, length_runs, padded_in_runs


def padded(lengths: Sequence[int], runs: Sequence[range], overhead: int) -> int:
    """Tokens the runs compute, each padded to its longest, plus ``overhead`` per extra run."""
    return sum(len(run) * lengths[run[-1]] for run in runs) + overhead * (len(runs) - 1)


def as_runs(lengths: Sequence[int], cuts: Sequence[int]) -> list[range]:
    bounds = [0, *cuts, len(lengths)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def best_padded(lengths: Sequence[int], overhead: int, most: int) -> int:
    """The least any split into at most ``most`` contiguous runs computes."""
    inner = range(1, len(lengths))
    return min(
        padded(lengths, as_runs(lengths, cuts), overhead)
        for count in range(most)
        for cuts in itertools.combinations(inner, count)
    )


sorted_lengths = st.lists(st.integers(1, 300), min_size=1, max_size=9).map(sorted)


def test_nothing_to_run() -> None:
    assert length_runs([]) == []


def test_equal_lengths_stay_one_run() -> None:
    assert length_runs([50] * 12) == [range(12)]


def test_a_split_that_saves_less_than_a_forward_is_not_made() -> None:
    # Splitting off the short one saves 100 - 60 = 40 padded tokens, under the overhead.
    assert length_runs([60, 100], overhead=96) == [range(2)]
    assert length_runs([60, 100], overhead=39) == [range(1), range(1, 2)]


def test_a_group_of_short_and_long_responses_splits_between_them() -> None:
    lengths = [32, 35, 40, 41, 150, 152, 158, 160]
    assert length_runs(lengths, overhead=96) == [range(4), range(4, 8)]


def test_never_more_than_the_most_runs() -> None:
    lengths = [10 * n for n in range(1, 40)]
    runs = length_runs(lengths, overhead=0, most=3)
    assert len(runs) == 3


@given(sorted_lengths, st.integers(0, 400), st.integers(1, MAX_RUNS))
def test_runs_cover_the_members_in_order(lengths: list[int], overhead: int, most: int) -> None:
    runs = length_runs(lengths, overhead=overhead, most=most)
    assert [n for run in runs for n in run] == list(range(len(lengths)))
    assert all(len(run) > 0 for run in runs)
    assert 1 <= len(runs) <= most


@given(sorted_lengths, st.integers(0, 400), st.integers(1, MAX_RUNS))
def test_runs_never_cost_more_than_one_and_near_the_best(
    lengths: list[int], overhead: int, most: int
) -> None:
    """Each split pays for its forward, so the runs cost at most one padded run; greedy
    splitting is not always the best split, but within a third of its padding here."""
    runs = length_runs(lengths, overhead=overhead, most=most)
    cost = padded(lengths, runs, overhead)
    one_run = len(lengths) * lengths[-1]
    assert cost <= one_run
    best = best_padded(lengths, overhead, most)
    assert cost - best <= (one_run - best) // 3 + overhead


@given(sorted_lengths)
def test_padded_in_runs_counts_each_run_padded_to_its_longest(lengths: list[int]) -> None:
    runs = length_runs(lengths)
    assert padded_in_runs(lengths) == padded(lengths, runs, overhead=0)
    assert sum(lengths) <= padded_in_runs(lengths) <= len(lengths) * lengths[-1]
