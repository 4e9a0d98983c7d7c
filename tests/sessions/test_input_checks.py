"""Input checks at the public entries (issue 16): token ids within the vocabulary, batch 1, no
beams; a call that fails commits nothing and leaves the session usable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hkv import wrap

from helpers.models import prompt, wrap_config


@pytest.fixture
def runtime(tiny_lm, tmp_path: Path):
    model = tiny_lm()
    with wrap(model, wrap_config(model, tmp_path)) as rt:
        yield rt


@pytest.mark.parametrize("bad", [[*range(1, 40), 256], [5, -1, 7], [3, 99999]])
def test_append_refuses_ids_outside_the_vocabulary_and_commits_nothing(runtime, bad: list[int]) -> None:
    with runtime.session("chat") as s:
        s.append(torch.arange(1, 40))
        before = s.info()
        with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 256\)"):
            s.append(torch.tensor(bad))
        assert s.info() == before and s.tokens.tolist() == list(range(1, 40))
        s.append(torch.tensor([40, 41]))  # still usable
        assert s.tokens.tolist()[-2:] == [40, 41]
    with runtime.session("chat") as s:
        assert s.tokens.tolist() == [*range(1, 40), 40, 41]


def test_generate_refuses_a_batch_beams_and_bad_ids(runtime) -> None:
    ids = prompt(40)[0]  # [40]
    with runtime.session("chat") as s:
        with pytest.raises(ValueError, match="batch size 1"):
            s.generate(torch.stack([ids, ids]), max_new_tokens=2)
        with pytest.raises(ValueError, match="num_beams = 2"):
            s.generate(ids, max_new_tokens=2, num_beams=2)
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            s.generate(torch.tensor([1, 2, 300]), max_new_tokens=2)
        with pytest.raises(ValueError, match="integer token ids"):
            s.generate(ids.float(), max_new_tokens=2)
        assert len(s.tokens) == 0  # nothing was taken
        out = s.generate(ids, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == len(ids) + 2
    with pytest.raises(ValueError, match="num_return_sequences = 3"):
        runtime.generate(ids, max_new_tokens=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        runtime.generate(torch.tensor([[1, 2, -4]]), max_new_tokens=2)
