"""The passkey prompt builder (hkv.passkey): length, depth of the key, determinism."""

from __future__ import annotations

import pytest


class _WordTokenizer:
    """Whitespace 'tokenizer' for testing the prompt builder without a model."""

    def __init__(self):
        self.vocab: dict[str, int] = {}  # ids by first appearance: deterministic, no collisions

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_length_depth_and_key(depth):
    from hkv.passkey import passkey_prompt

    tok = _WordTokenizer()
    ids, key = passkey_prompt(tok, 2000, depth, seed=5)
    assert abs(len(ids) - 2000) <= 20 and len(key) == 5 and key.isdigit()
    assert passkey_prompt(tok, 2000, depth, seed=5) == (ids, key), "deterministic in the seed"
    assert passkey_prompt(tok, 2000, depth, seed=6)[1] != key
    needle = tok.encode(f"{key}.")[0]
    where = ids.index(needle) / len(ids)
    assert abs(where - depth) < 0.1
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, 2000, 1.5)
