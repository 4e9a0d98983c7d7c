"""The RULER-style tasks (issue 17, part 4): facts really in the document, distractors distinct,
lengths as asked, and the scorer."""

from __future__ import annotations

import re

import pytest

from hkv.ruler import TASKS, make_task, score, sized_task

from helpers.models import ByteTokenizer


@pytest.mark.parametrize("name", TASKS)
def test_tasks_hold_their_answers_at_the_asked_length(name: str) -> None:
    task, document, question = sized_task(ByteTokenizer(), name, 3000, seed=1)
    assert abs(len(document) + len(question) - 3000) <= 60
    assert all(answer in task.document for answer in task.answers)
    assert make_task(name, 50, seed=1) == make_task(name, 50, seed=1)  # deterministic
    assert make_task(name, 50, seed=1) != make_task(name, 50, seed=2)


def test_distractors_and_filler() -> None:
    task = make_task("multikey", 200, seed=3)
    numbers = re.findall(r"special magic number for \w+ is (\d+)", task.document)
    assert len(numbers) == 4 and len(set(numbers)) == 4 and task.answers[0] in numbers  # three distractors
    sentences = [s for s in task.document.split(". ") if s]
    assert len(set(sentences)) > 0.9 * len(sentences)  # not one repeated paragraph
    chain = make_task("vartrack", 200, seed=3)
    assert all(f"VAR {name} =" in chain.document for name in chain.answers) and chain.document.count("VAR Y") == 3
    words = make_task("wordcount", 200, seed=3)
    listed = words.document.split("\n")[1].split()
    top = sorted(set(listed), key=listed.count, reverse=True)[:3]
    assert set(top) == set(words.answers)


def test_score() -> None:
    task = make_task("multivalue", 40, seed=0)
    assert score(task, " and ".join(task.answers)) == 1.0
    assert score(task, task.answers[0]) == pytest.approx(1 / 3)
    assert score(task, "none") == 0.0
