"""Passkey prompts: a key hidden in filler text at a chosen depth, and reading the model's answer.

Used by the demo, the benchmarks and the tests; any tokenizer with ``encode`` / ``decode``.
"""

from __future__ import annotations

import random
from typing import Any

_INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the pass key.\n"
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(tokenizer: Any, n_tokens: int, depth: float, key: int | str | None = None, seed: int = 0) -> tuple[list[int], str]:
    """A passkey-retrieval prompt of about ``n_tokens`` tokens: ``(token_ids, key)``.

    Filler text with ``"The pass key is KEY. Remember it. KEY is the pass key."`` at relative
    ``depth`` (0 = start, 1 = end of the filler), then the question and the raw completion cue
    ``"The pass key is"``; the answer is the next 5 digits. ``key`` defaults to a 5-digit number
    drawn from ``seed``. The length is within a few tokens of ``n_tokens``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth = {depth} must be between 0 and 1")
    key = str(key) if key is not None else str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = PASSKEY_QUESTION
    fixed = len(tokenizer.encode(_INTRO + needle + question, add_special_tokens=False))
    per_filler = len(tokenizer.encode(_FILLER * 8, add_special_tokens=False)) / 8
    repeats = max(1, round((n_tokens - fixed) / per_filler))
    for _ in range(3):  # the per-filler estimate drifts over long prompts: correct the count
        ids = _passkey_ids(tokenizer, repeats, depth, needle, question)
        fix = round((n_tokens - len(ids)) / per_filler)
        if fix == 0 or repeats + fix < 1:
            break
        repeats += fix
    return ids, key


def _passkey_ids(tokenizer: Any, repeats: int, depth: float, needle: str, question: str) -> list[int]:
    before = round(repeats * depth)
    text = _INTRO + _FILLER * before + needle + _FILLER * (repeats - before) + question
    return tokenizer.encode(text, add_special_tokens=False)


def split_passkey_question(tokenizer: Any, ids: list[int]) -> tuple[list[int], list[int]]:
    """``(document, question)`` token ids of a :func:`passkey_prompt`: the question (and the
    answer cue) alone, for tasks where it arrives in a later turn than the document."""
    question = tokenizer.encode(PASSKEY_QUESTION, add_special_tokens=False)
    if ids[-len(question) :] == question:
        return ids[: -len(question)], question
    # the question merged with the text before it into one token: re-encode the document alone
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.encode(text[: text.rindex(PASSKEY_QUESTION)], add_special_tokens=False), question


def passkey_answer(tokenizer: Any, generated_ids: Any) -> str:
    """The digits the model produced after the cue (``generated_ids``: the new tokens only)."""
    text = tokenizer.decode(list(generated_ids), skip_special_tokens=True)
    digits = ""
    for char in text.strip():
        if char.isdigit():
            digits += char
        elif digits:
            break
    return digits
