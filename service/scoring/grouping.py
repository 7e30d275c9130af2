"""What a batch costs when its items that share a prompt run the prompt once (no torch here).

The batcher forms batches with this (its tests run without torch); the forward's own plan is
``service/scoring/prefix.py``. A grouped forward runs in two parts, each right padded: the
groups' shared prefixes, padded to the longest, then every member's own tokens, padded to the
longest of those, attending to an expanded copy of its group's prefix. Items without a group
run in full, padded to the longest of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from service.scoring.types import Encoded

# Below this a shared prefix saves less than the extra forward costs.
MIN_PREFIX_TOKENS = 16
# The expanded prefix cache (members x longest prefix) may hold this many times the token budget:
# a member's copy of its prompt's keys and values stays for the whole forward, where a full
# forward's activations only live for one layer.
EXPANDED_CACHE_FACTOR = 2
# A forward of its own costs about as much as this many more padded tokens (the tiny llama on
# one CPU core: 1 ms against 12 us a token), and one batch runs in at most so many forwards.
RUN_OVERHEAD_TOKENS = 96
MAX_RUNS = 4


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens that every row has in common (compared a slice at a time:
    the forward plans each batch with this, a group's prompt of hundreds of tokens each)."""
    first = rows[0]
    shared = min(len(row) for row in rows)
    for row in rows[1:]:
        shared = _shared(first, row, shared)
    return shared


@dataclass(slots=True)
class _Group:
    """The members of one prompt so far: the first one's tokens, and the tokens all share
    (short of every member's last token, which must be its own)."""

    first: Sequence[int]
    shared: int
    members: int = 1
    longest: int = 0

    @property
    def grouped(self) -> bool:
        return self.members >= 2 and self.shared >= MIN_PREFIX_TOKENS


@dataclass(frozen=True, slots=True)
class Cost:
    """Tokens a batch computes, and the tokens its expanded prefix cache holds."""

    computed: int
    expanded: int


@dataclass
class GroupedCost:
    """The cost of a batch as items are added to it, with items of one ``prefix_key`` sharing
    their common leading tokens."""

    max_batch_tokens: int
    _groups: dict[str, _Group] = field(default_factory=dict)
    _plain: list[int] = field(default_factory=list)  # lengths of items without a prompt key

    @property
    def items(self) -> int:
        return len(self._plain) + sum(group.members for group in self._groups.values())

    def fits(self, item: Encoded) -> bool:
        """Whether the batch with ``item`` added stays within the budget (an empty batch takes
        anything, so an item longer than the budget still runs)."""
        if not self.items:
            return True
        undo = self._apply(item)
        within = self._within()
        undo()
        return within

    def try_add(self, item: Encoded) -> bool:
        """Add ``item`` if the batch still fits with it; whether it was added."""
        if not self.items:
            self.add(item)
            return True
        undo = self._apply(item)
        if self._within():
            return True
        undo()
        return False

    def try_add_all(self, items: Sequence[Encoded]) -> bool:
        """Add every one of ``items`` if the batch still fits with all of them, else none;
        whether they were added. (An empty batch takes them all.)"""
        empty = not self.items
        undos = [self._apply(item) for item in items]
        if empty or self._within():
            return True
        for undo in reversed(undos):
            undo()
        return False

    def add(self, item: Encoded) -> None:
        self._apply(item)

    def _within(self) -> bool:
        cost = self.cost()
        return (
            cost.computed <= self.max_batch_tokens
            and cost.expanded <= EXPANDED_CACHE_FACTOR * self.max_batch_tokens
        )

    def _apply(self, item: Encoded) -> Callable[[], object]:
        """Count ``item`` in; returns what takes it out again."""
        key = item.prefix_key
        if key is None or item.token_type_ids is not None:
            self._plain.append(item.length)
            return self._plain.pop
        group = self._groups.get(key)
        if group is None:
            self._groups[key] = _Group(item.input_ids, item.length - 1, longest=item.length)
            return functools.partial(self._groups.pop, key)
        before = (group.shared, group.members, group.longest)
        known = min(group.shared, item.length - 1)
        group.shared = _shared(group.first, item.input_ids, known)
        group.members += 1
        group.longest = max(group.longest, item.length)

        def undo() -> None:
            group.shared, group.members, group.longest = before

        return undo

    def cost(self) -> Cost:
        """What the batch as it stands computes."""
        grouped = [group for group in self._groups.values() if group.grouped]
        lone = [group for group in self._groups.values() if not group.grouped]
        # Items that run in full are padded to the longest of them.
        plain = len(self._plain) + sum(group.members for group in lone)
        plain_width = max([*self._plain, *(group.longest for group in lone)], default=0)
        prefix = max((group.shared for group in grouped), default=0)
        suffix = max((group.longest - group.shared for group in grouped), default=0)
        members = sum(group.members for group in grouped)
        return Cost(
            computed=len(grouped) * prefix + members * suffix + plain * plain_width,
            expanded=members * prefix,
        )


def shared_tokens(first: Sequence[int], other: Sequence[int]) -> int:
    """The number of leading tokens two rows have in common (compared a slice at a time)."""
    return _shared(first, other, min(len(first), len(other)))


def _shared(first: Sequence[int], other: Sequence[int], known: int) -> int:
    """The leading tokens ``other`` shares with ``first``, of at most ``known``: compared a
    slice at a time (the batcher runs this under its lock, once per item it considers), where
    a member sharing its whole prompt costs one comparison."""
    if other[:known] == first[:known]:
        return known
    low, high = 0, known  # other[:low] matches, other[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if other[low:middle] == first[low:middle]:
            low = middle
        else:
            high = middle
    return low


def length_runs(
    lengths: Sequence[int], overhead: int = RUN_OVERHEAD_TOKENS, most: int = MAX_RUNS
) -> list[range]:
    """Runs of ``lengths`` (ascending) to forward one run at a time, each padded to its
    longest: the run that saves the most padded tokens is split in two while that saves more
    than a forward of its own costs (``overhead`` tokens), into at most ``most`` runs. A batch
    formed from the few items waiting spans lengths a sort over many items would keep apart;
    its forward pads no more than its runs need."""
    runs = [(0, len(lengths))] if lengths else []
    while 0 < len(runs) < most:
        saving, split, index = max(
            _best_split(lengths, start, end) + (index,) for index, (start, end) in enumerate(runs)
        )
        if saving <= overhead:
            break
        start, end = runs[index]
        runs[index : index + 1] = [(start, split), (split, end)]
    return [range(start, end) for start, end in runs]


def padded_in_runs(lengths: Sequence[int]) -> int:
    """The tokens ``lengths`` (ascending) compute in their ``length_runs``, padding included."""
    return sum(len(run) * lengths[run[-1]] for run in length_runs(lengths))


def _best_split(lengths: Sequence[int], start: int, end: int) -> tuple[int, int]:
    """The padded tokens saved by the best split of ``lengths[start:end]`` in two, and where
    the second part starts (no saving, at ``start``, for a run of one)."""
    longest = lengths[end - 1]
    splits = (
        ((split - start) * (longest - lengths[split - 1]), split) for split in range(start + 1, end)
    )
    return max(splits, default=(0, start))
