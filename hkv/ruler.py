"""RULER-style synthetic long-context tasks, generated locally (no download), over a filler that
is not one repeated paragraph: seeded sentences drawn from a word list.

Each task gives a document (filler with the facts hidden at spread-out depths), a question with
its answer cue, and the expected answers; :func:`score` says which were found in the reply.

- ``multikey``: four "The special magic number for <key> is <n>." facts; one key is asked for,
  three are distractors with their own numbers;
- ``multivalue``: one key given three different numbers at three depths; all three are asked for;
- ``vartrack``: ``VAR X1 = <n>.`` then ``VAR X2 = VAR X1.`` ... a chain of four assignments
  through the document, plus a distractor chain; the variables holding ``<n>`` are asked for;
- ``wordcount``: a list of words in which three appear far more often than the others; the three
  most frequent are asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

TASKS = ("multikey", "multivalue", "vartrack", "wordcount")
_WORDS = (
    "river mountain garden window paper engine summer winter market silver orange forest bridge village ocean "
    "candle station pocket letter number yellow purple kitchen doctor teacher planet rocket castle island "
    "morning evening thunder meadow harbor lantern marble pencil ribbon saddle timber velvet whistle anchor "
    "basket circle dragon feather gravel helmet jacket ladder mirror needle orchard parrot quarry rabbit "
    "shadow tunnel violin wagon barrel cabin dentist falcon glacier hammer insect jungle kettle lemon"
).split()
_VERBS = "watched carried painted found visited measured followed opened borrowed described".split()
_COUNT_WORDS = "apple banana cherry grape melon peach pear plum lime kiwi mango papaya".split()


@dataclass(frozen=True, slots=True)
class Task:
    """One generated task: the document, the question (with its answer cue), what must be found."""

    name: str
    document: str
    question: str
    answers: tuple[str, ...]


def _sentence(rng: random.Random) -> str:
    a, b, c = rng.sample(_WORDS, 3)
    return f"The {a} {rng.choice(_VERBS)} the {b} near the {c}. "


def _filler(rng: random.Random, sentences: int) -> list[str]:
    return [_sentence(rng) for _ in range(sentences)]


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _place(filler: list[str], facts: list[str], rng: random.Random) -> str:
    """Insert ``facts`` at spread-out depths (in order) into ``filler``."""
    slots = sorted(rng.sample(range(1, len(filler)), len(facts))) if len(filler) > len(facts) else list(range(len(facts)))
    out, last = [], 0
    for slot, fact in zip(slots, facts):
        out += filler[last:slot] + [fact + " "]
        last = slot
    return "".join(out + filler[last:])


def make_task(name: str, sentences: int, seed: int) -> Task:
    """Task ``name`` over ``sentences`` filler sentences (about 14 tokens each)."""
    rng = random.Random(f"{name}-{seed}")
    filler = _filler(rng, sentences)
    if name == "multikey":
        keys = rng.sample(_WORDS, 4)
        values = [_number(rng) for _ in keys]
        facts = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
        rng.shuffle(facts)
        target = rng.randrange(4)
        question = f"\nWhat is the special magic number for {keys[target]}? The special magic number for {keys[target]} is"
        return Task(name, _place(filler, facts, rng), question, (values[target],))
    if name == "multivalue":
        key, values = rng.choice(_WORDS), [_number(rng) for _ in range(3)]
        facts = [f"One of the special magic numbers for {key} is {v}." for v in values]
        question = f"\nWhat are all the special magic numbers for {key}? The special magic numbers for {key} are"
        return Task(name, _place(filler, facts, rng), question, tuple(values))
    if name == "vartrack":
        value, other = _number(rng), _number(rng)
        names = [f"X{rng.randint(10, 99)}{i}" for i in range(4)]
        decoys = [f"Y{rng.randint(10, 99)}{i}" for i in range(2)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
        decoy = [f"VAR {decoys[0]} = {other}.", f"VAR {decoys[1]} = VAR {decoys[0]}."]
        facts = chain[:2] + decoy + chain[2:]
        question = f"\nWhich variables are assigned the value {value}? The variables assigned the value {value} are"
        return Task(name, _place(filler, facts, rng), question, tuple(names))
    if name == "wordcount":
        common = rng.sample(_COUNT_WORDS, 3)
        rare = [w for w in _COUNT_WORDS if w not in common]
        words = common * max(8, sentences // 4) + rare * max(2, sentences // 40)
        rng.shuffle(words)
        document = "Here is a list of words:\n" + " ".join(words) + "\n" + "".join(filler[: sentences // 2])
        question = "\nWhat are the three most frequent words in the list above? The three most frequent words are"
        return Task(name, document, question, tuple(common))
    raise ValueError(f"unknown task {name!r}: one of {', '.join(TASKS)}")


def sized_task(tokenizer: Any, name: str, n_tokens: int, seed: int) -> tuple[Task, list[int], list[int]]:
    """Task ``name`` of about ``n_tokens`` tokens: ``(task, document ids, question ids)``."""
    sentences = max(8, n_tokens // 14)
    for _ in range(4):  # correct the filler for the tokenizer
        task = make_task(name, sentences, seed)
        document = tokenizer.encode(task.document, add_special_tokens=False)
        question = tokenizer.encode(task.question, add_special_tokens=False)
        total = len(document) + len(question)
        if abs(total - n_tokens) <= max(16, n_tokens // 50):
            break
        sentences = max(8, round(sentences * n_tokens / total))
    return task, document, question


def score(task: Task, reply: str) -> float:
    """Fraction of the task's answers that appear in ``reply``."""
    return sum(answer in reply for answer in task.answers) / len(task.answers)
