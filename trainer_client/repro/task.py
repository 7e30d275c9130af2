"""A text task with a known gold reward, small enough to run RLHF on two CPU cores.

Prompts ask for a few words on a topic, optionally with a length cue: ``"describe the sea"``,
``"write about the forest briefly"``, ``"tell me about the city in detail"``. A response is
lower-case vocabulary words joined by single spaces. The gold reward is a hidden function of the
response's words; reward models only ever see it through preference pairs, as a real RM only
sees human labels.

The gold reward of ``response`` for ``prompt``, with ``words = response.split()`` and ``n =
len(words)``; the prompt gives a topic (the topic name among its words) and a target length
``T`` (10; 6 with the cue "briefly"; 14 with "detail"):

- **content** = ``content_scale * sum over DISTINCT words u of s(u)``, where ``s(u)`` is
  ``relevance + topic_value_scale * v(u)`` for a word of the prompt's topic (0.5 to 1.5 with the
  defaults), ``off_topic + off_topic_value_scale * v(u)`` for a word of another topic (-0.5 to
  0), ``generic_value_scale * v(u)`` for a generic word (-0.6 to 0.6), 0 for a function word
  and ``unknown`` (-1) for anything not in the vocabulary. ``v(u)`` in [-1, 1] is the word's
  hidden value, drawn once per task from its seed.
- **repetition** = ``repeat_cost * sum over words u of max(0, count(u) - allowance(u))``, with
  an allowance of 2 for function words ("the ... the" is ordinary text) and 1 for the others.
  A repeat adds nothing to content, so saying a good word again is a loss.
- **over_length** = ``over_length_cost * max(0, n - T)``: one more good on-topic word past the
  target adds at most 0.45 of content but costs 0.5, so gold falls past the target.
- **short** = ``short_cost * max(0, min_length - n)``: an empty answer is not a safe one.
- ``raw = content - repetition - over_length - short - offset``, and ``gold = squash *
  tanh(raw / squash)``: close to ``raw`` in the range that matters, and always finite, in
  (-3, 3) with the defaults, whatever the strings.

So the best answers are ``T`` distinct on-topic words of high hidden value (about +1.7, +2.3
and +2.5 with the defaults for T = 6, 10, 14), while the SFT text (``sft_response``) mixes
function words, generic and off-topic words at lengths mostly under the target: its gold is
about 0.0 on average, with a standard deviation of about 0.75. Within that distribution more
good words make a better answer and over-long or repetitive answers are rare; a reward model
that learned "more of a good word is better" or "longer is better" from it is right on
SFT-like text and wrong past the target or on repeats, where PPO can find its errors:
over-optimisation (proxy up, gold down) has room to show.

Words that only prompts use (the topic names, "write", "briefly" ...) count as unknown in a
response: an answer is not rewarded for echoing its prompt.

Pure Python (no torch): the reward models and the policy live in ``models``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

# Each topic's on-topic words. Every word belongs to one class only: a topic, generic, function.
TOPICS: tuple[tuple[str, str], ...] = (
    ("sea", "waves salt shore tide boat fish blue deep sailor harbor"),
    ("forest", "trees moss deer leaves pine shade owl trail roots fern"),
    ("city", "streets traffic towers lights crowd bus market noise bridge cafe"),
    ("music", "song drum guitar melody rhythm choir piano dance chord voice"),
    ("food", "bread soup spice cheese kitchen bake apple honey dinner taste"),
    ("space", "stars planet moon rocket orbit comet galaxy dark astronaut sky"),
    ("winter", "snow ice cold frost fire coat sled storm white scarf"),
    ("garden", "flowers roses soil bees seeds rain sun grass fence bloom"),
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


GENERIC_WORDS: tuple[str, ...] = _words(
    "good nice beautiful quiet old new small big bright soft warm gentle strange lovely happy "
    "sad calm wild simple great little bad ugly boring thing stuff very really always never "
    "slow fast long wonderful fine"
)

FUNCTION_WORDS: tuple[str, ...] = _words(
    "the a and is are of with to it we i there my on at by so but all in"
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "write about the {topic}",
    "describe the {topic}",
    "tell me about the {topic}",
    "say something about the {topic}",
)

# Appended to a template; a cue word found in a prompt sets its target length.
LENGTH_SUFFIXES: tuple[str, ...] = ("", " briefly", " in detail")
LENGTH_CUES: tuple[tuple[str, int], ...] = (("briefly", 6), ("detail", 14))


class WordRole(Enum):
    """What a vocabulary word is to the gold reward (relative to one prompt's topic)."""

    FUNCTION = "function"
    GENERIC = "generic"
    TOPIC = "topic"


@dataclass(frozen=True, kw_only=True)
class Topic:
    """A prompt topic and the words that are on-topic for it."""

    name: str
    words: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class GoldWeights:
    """The constants of the gold reward (see the module docstring for the formula)."""

    relevance: float = 1.0
    topic_value_scale: float = 0.5
    off_topic: float = -0.25
    off_topic_value_scale: float = 0.25
    generic_value_scale: float = 0.6
    unknown: float = -1.0
    content_scale: float = 0.3
    repeat_cost: float = 0.5
    function_allowance: int = 2
    over_length_cost: float = 0.5
    min_length: int = 3
    short_cost: float = 0.5
    offset: float = 0.4
    squash: float = 3.0


@dataclass(frozen=True, kw_only=True)
class SFTStyle:
    """How the SFT text is drawn: mediocre on purpose, so PPO has room to improve.

    Its length is Gaussian around ``length_ratio * T`` (sd ``length_sd_ratio * T + 1``), cut to
    [``min_words``, ``max_words``]: mostly under the target, where longer is better. Each
    response draws its focus, a probability uniform in ``on_topic_range``; after the first
    word, a word is a function word with ``p_function``, else a content word: with
    ``repeat_rate`` one said already, else an unused on-topic word with that focus, an unused
    generic word (``generic_share`` of the rest) or a word of another topic. The varying focus
    gives the wide spread of gold that PPO can climb; over-long and repetitive answers are
    rare, so a reward model learns little about them from SFT text alone.
    """

    length_ratio: float = 0.7
    length_sd_ratio: float = 0.2
    min_words: int = 3
    max_words: int = 16
    p_function: float = 0.3
    on_topic_range: tuple[float, float] = (0.0, 0.9)
    generic_share: float = 0.55
    repeat_rate: float = 0.05


@dataclass(frozen=True, kw_only=True)
class GoldBreakdown:
    """The parts of one gold reward, for tests and reports."""

    content: float
    repetition: float
    over_length: float
    short: float
    raw: float
    gold: float


@dataclass(frozen=True, kw_only=True)
class PreferencePair:
    """Two responses to one prompt, ``chosen`` the one labelled better."""

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True, kw_only=True)
class GoldTask:
    """The task: its vocabulary, the hidden word values and the gold reward's constants."""

    topics: tuple[Topic, ...]
    generic_words: tuple[str, ...]
    function_words: tuple[str, ...]
    word_values: tuple[tuple[str, float], ...]
    prompt_templates: tuple[str, ...] = PROMPT_TEMPLATES
    length_suffixes: tuple[str, ...] = LENGTH_SUFFIXES
    length_cues: tuple[tuple[str, int], ...] = LENGTH_CUES
    default_target: int = 10
    weights: GoldWeights = field(default_factory=GoldWeights)
    sft: SFTStyle = field(default_factory=SFTStyle)
    _values: dict[str, float] = field(init=False, repr=False, compare=False, hash=False)
    _topic_of_word: dict[str, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        topic_of_word = {word: topic.name for topic in self.topics for word in topic.words}
        roles = [set(topic_of_word), set(self.generic_words), set(self.function_words)]
        if sum(len(r) for r in roles) != len(set().union(*roles)):
            raise ValueError("a word may belong to one topic or word class only")
        values = dict(self.word_values)
        if missing := (set(topic_of_word) | set(self.generic_words)) - set(values):
            raise ValueError(f"hidden values missing for {sorted(missing)[:5]}")
        # Lookups built once: the gold reward runs for every PPO sample.
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_topic_of_word", topic_of_word)

    def words(self) -> list[str]:
        """Every word a prompt or response may contain, in a fixed order (the tokenizer's)."""
        prompt_words = [w for t in self.prompt_templates for w in t.split() if w != "{topic}"]
        suffix_words = [w for s in self.length_suffixes for w in s.split()]
        ordered = [
            *self.function_words,
            *prompt_words,
            *suffix_words,
            *(t.name for t in self.topics),
            *self.generic_words,
            *(w for t in self.topics for w in t.words),
        ]
        return list(dict.fromkeys(ordered))

    def all_prompts(self) -> list[str]:
        """Every distinct prompt of the task (topic x template x length cue)."""
        return [
            template.format(topic=topic.name) + suffix
            for topic in self.topics
            for template in self.prompt_templates
            for suffix in self.length_suffixes
        ]

    def prompts(self, n: int, seed: int) -> list[str]:
        """``n`` prompts, the same for the same seed: passes over all prompts, each pass
        shuffled, so topics and length cues stay balanced."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"prompts:{seed}")
        out: list[str] = []
        while len(out) < n:
            batch = self.all_prompts()
            rng.shuffle(batch)
            out.extend(batch[: n - len(out)])
        return out

    def topic_of(self, prompt: str) -> Topic | None:
        """The topic a prompt names (the first topic name among its words), if any."""
        by_name = {topic.name: topic for topic in self.topics}
        return next((by_name[w] for w in prompt.split() if w in by_name), None)

    def target_length(self, prompt: str) -> int:
        """The response length the gold reward wants for ``prompt``, from its length cue."""
        words = set(prompt.split())
        return next((t for cue, t in self.length_cues if cue in words), self.default_target)

    def gold_reward(self, prompt: str, response: str) -> float:
        """The gold reward of ``response`` to ``prompt``: deterministic and finite for any
        strings (see the module docstring)."""
        return self.gold_breakdown(prompt, response).gold

    def gold_breakdown(self, prompt: str, response: str) -> GoldBreakdown:
        """The gold reward and its parts."""
        w = self.weights
        words = response.split()
        counts = Counter(words)
        topic = self.topic_of(prompt)
        content = w.content_scale * sum(self._word_score(u, topic) for u in counts)
        repetition = w.repeat_cost * sum(max(0, c - self._allowance(u)) for u, c in counts.items())
        over_length = w.over_length_cost * max(0, len(words) - self.target_length(prompt))
        short = w.short_cost * max(0, w.min_length - len(words))
        raw = content - repetition - over_length - short - w.offset
        return GoldBreakdown(
            content=content,
            repetition=repetition,
            over_length=over_length,
            short=short,
            raw=raw,
            gold=w.squash * math.tanh(raw / w.squash),
        )

    def role(self, word: str) -> WordRole | None:
        """A word's class, or None for a word outside the vocabulary (or a prompt-only word)."""
        if word in self._topic_of_word:
            return WordRole.TOPIC
        if word in self._values:
            return WordRole.GENERIC
        if word in self.function_words:
            return WordRole.FUNCTION
        return None

    def _word_score(self, word: str, topic: Topic | None) -> float:
        w = self.weights
        role = self.role(word)
        if role is None:
            return w.unknown
        if role is WordRole.FUNCTION:
            return 0.0
        value = self._values[word]
        if role is WordRole.GENERIC:
            return w.generic_value_scale * value
        if topic is not None and self._topic_of_word[word] == topic.name:
            return w.relevance + w.topic_value_scale * value
        return w.off_topic + w.off_topic_value_scale * value

    def _allowance(self, word: str) -> int:
        return self.weights.function_allowance if word in self.function_words else 1

    def sft_response(self, rng: random.Random, prompt: str) -> str:
        """One response of the kind the SFT policy imitates (see ``SFTStyle``)."""
        style = self.sft
        target = self.target_length(prompt)
        length = round(rng.gauss(style.length_ratio * target, style.length_sd_ratio * target + 1))
        length = min(style.max_words, max(style.min_words, length))
        topic = self.topic_of(prompt)
        focus = rng.uniform(*style.on_topic_range)
        words = [self._content_word(rng, topic, focus, [])]
        while len(words) < length:
            if rng.random() < style.p_function:
                words.append(rng.choice(self.function_words))
            else:
                words.append(self._content_word(rng, topic, focus, words))
        return " ".join(words)

    def _content_word(
        self, rng: random.Random, topic: Topic | None, focus: float, said: Sequence[str]
    ) -> str:
        """A content word for a response that has ``said`` words so far (see ``SFTStyle``)."""
        content_said = [w for w in said if self.role(w) not in (WordRole.FUNCTION, None)]
        if content_said and rng.random() < self.sft.repeat_rate:
            return rng.choice(content_said)
        draw = rng.random()
        if topic is not None and draw < focus:
            pool: Sequence[str] = topic.words
        elif draw < focus + (1 - focus) * self.sft.generic_share:
            pool = self.generic_words
        else:
            pool = rng.choice([t for t in self.topics if t != topic]).words
        unused = [w for w in pool if w not in said]
        return rng.choice(unused or pool)

    def preference_pairs(
        self, n: int, seed: int, *, p_perturbed: float = 0.35, min_gap: float = 0.05
    ) -> list[PreferencePair]:
        """``n`` pairs of responses to the same prompt, labelled by gold (chosen first).

        Mostly two SFT-like responses, so a reward model learns the SFT distribution (and is
        wrong off it the way a real one is); with ``p_perturbed`` the second is the first made
        longer, repetitive, shorter or with a word replaced, so it learns a little about those.
        Pairs whose gold differs by less than ``min_gap`` are drawn again: a near tie says
        nothing about which answer is better.
        """
        rng = random.Random(f"pairs:{seed}")
        pairs: list[PreferencePair] = []
        for prompt in self.prompts(n, seed):
            while True:
                first = self.sft_response(rng, prompt)
                if rng.random() < p_perturbed:
                    second = self.perturbed(rng, prompt, first)
                else:
                    second = self.sft_response(rng, prompt)
                gap = self.gold_reward(prompt, first) - self.gold_reward(prompt, second)
                if abs(gap) >= min_gap:
                    break
            chosen, rejected = (first, second) if gap > 0 else (second, first)
            pairs.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected))
        return pairs

    def perturbed(self, rng: random.Random, prompt: str, response: str) -> str:
        """``response`` made longer, repetitive, shorter or with one word replaced."""
        words = response.split()
        topic = self.topic_of(prompt)
        kind = rng.choice(("extend", "repeat", "replace", "truncate")) if words else "extend"
        if kind == "extend":
            focus = rng.uniform(*self.sft.on_topic_range)
            for _ in range(rng.randint(1, 6)):
                words.append(self._content_word(rng, topic, focus, words))
        elif kind == "repeat":
            word = rng.choice(words)
            for _ in range(rng.randint(1, 3)):
                words.insert(rng.randrange(len(words) + 1), word)
        elif kind == "replace":
            focus = rng.uniform(*self.sft.on_topic_range)
            words[rng.randrange(len(words))] = self._content_word(rng, topic, focus, words)
        elif len(words) > 1:
            words = words[: max(1, len(words) - rng.randint(1, 3))]
        return " ".join(words)


def default_task(seed: int = 0) -> GoldTask:
    """The task of the reproduction; ``seed`` draws the hidden word values."""
    topics = tuple(Topic(name=name, words=_words(words)) for name, words in TOPICS)
    valued = [*GENERIC_WORDS, *(w for topic in topics for w in topic.words)]
    rng = random.Random(f"word-values:{seed}")
    values = tuple((word, round(rng.uniform(-1.0, 1.0), 3)) for word in valued)
    return GoldTask(
        topics=topics,
        generic_words=GENERIC_WORDS,
        function_words=FUNCTION_WORDS,
        word_values=values,
    )


def flip_labels(
    pairs: Sequence[PreferencePair], fraction: float, seed: int
) -> list[PreferencePair]:
    """``pairs`` with exactly ``round(fraction * len(pairs))`` of them swapped (mislabelled).

    The pairs to flip are the first of one seeded permutation, so with the same seed the
    flips at 0.2 are a subset of those at 0.4: noise levels differ by their noise only.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"flip fraction must be in [0, 1], got {fraction}")
    order = list(range(len(pairs)))
    random.Random(f"flips:{seed}").shuffle(order)
    flipped = set(order[: round(fraction * len(pairs))])
    return [
        PreferencePair(prompt=p.prompt, chosen=p.rejected, rejected=p.chosen) if i in flipped else p
        for i, p in enumerate(pairs)
    ]
