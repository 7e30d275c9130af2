"""Length-sorted token-budget batches: every item once, budgets respected; how many device
threads run them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from service.scoring import model
from service.scoring.model import WorkerPlan, plan_batches, plan_workers

lengths_st = st.lists(st.integers(min_value=1, max_value=600), max_size=200)
budget_st = st.integers(min_value=1, max_value=4096)


@given(lengths_st, budget_st)
def test_every_item_lands_in_exactly_one_batch(lengths: list[int], budget: int) -> None:
    batches = plan_batches(lengths, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(batches)


@given(lengths_st, budget_st)
def test_padded_size_fits_the_budget_unless_alone(lengths: list[int], budget: int) -> None:
    for batch in plan_batches(lengths, budget):
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= budget or len(batch) == 1


@given(lengths_st, budget_st)
def test_batches_are_length_sorted(lengths: list[int], budget: int) -> None:
    order = [lengths[i] for batch in plan_batches(lengths, budget) for i in batch]
    assert order == sorted(order)


def test_similar_lengths_share_a_batch() -> None:
    # 6 items of 10 tokens fit one 64-token batch; the 60-token item goes alone.
    assert plan_batches([10, 60, 10, 10, 10, 10, 10], 64) == [[0, 2, 3, 4, 5, 6], [1]]


@pytest.mark.parametrize(
    ("cores", "requested", "plan"),
    [
        (2, None, WorkerPlan(workers=2, threads_each=1)),
        (16, None, WorkerPlan(workers=2, threads_each=8)),
        (1, None, WorkerPlan(workers=1, threads_each=1)),
        (8, 1, WorkerPlan(workers=1, threads_each=8)),
        (8, 3, WorkerPlan(workers=3, threads_each=2)),
        (2, 4, WorkerPlan(workers=4, threads_each=1)),
    ],
)
def test_a_cpu_shares_its_cores_among_device_threads(
    monkeypatch: pytest.MonkeyPatch, cores: int, requested: int | None, plan: WorkerPlan
) -> None:
    monkeypatch.setattr(model, "cpu_threads", lambda: cores)
    assert plan_workers(requested, torch.device("cpu")) == plan


def test_the_cores_shared_are_those_before_any_device_thread_took_its_share() -> None:
    """A device thread's torch.set_num_threads is what threads started later read: a version
    loaded after a swap must still plan with the machine's cores, not one thread's share."""
    import threading

    cores = model.cpu_threads()
    share = threading.Thread(target=torch.set_num_threads, args=(1,))
    share.start()
    share.join()
    try:
        seen: list[int] = []
        later = threading.Thread(target=lambda: seen.append(model.cpu_threads()))
        later.start()
        later.join()
        assert seen == [cores]
    finally:
        torch.set_num_threads(cores)


@pytest.mark.parametrize(("requested", "workers"), [(None, 1), (2, 2)])
def test_a_gpu_gets_one_device_thread_unless_asked(requested: int | None, workers: int) -> None:
    assert plan_workers(requested, torch.device("cuda")) == WorkerPlan(workers, None)
