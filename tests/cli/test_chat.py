"""The chat loop (hkv.cli.chat): only the new turn is encoded, a second run resumes the session,
bad names are refused before loading a model; two runs on SmolLM2 answer as one conversation (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hkv
from hkv.cli.chat import TurnEncoder, run_chat

from helpers.cli import assert_clean_error


class CharTokenizer:
    """A byte-level stand-in with a ChatML-like template (ids = byte values, eos = 3)."""

    chat_template = "chatml-like"
    eos_token, eos_token_id = "\x03", 3

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        head = "" if messages and messages[0]["role"] == "system" else "<system>default\x03\n"
        text = head + "".join(f"<{m['role']}>{m['content']}\x03\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i != 3).decode(errors="replace")

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}


def test_turn_encoder_encodes_only_the_new_turn() -> None:
    encoder = TurnEncoder(CharTokenizer(), system="be brief")
    first = encoder.text("hi", first=True)
    assert first == "<system>be brief\x03\n<user>hi\x03\n<assistant>"
    assert encoder.text("again", first=False) == "\n<user>again\x03\n<assistant>"
    # a reply cut by max_new_tokens is closed before the next turn
    assert encoder.text("again", first=False, previous_ended=False) == "\x03\n<user>again\x03\n<assistant>"
    ids = encoder.ids("again", history=torch.tensor([5, 3]))
    assert bytes(ids[0].tolist()).decode() == "\n<user>again\x03\n<assistant>"


def test_chat_resumes_in_a_second_run(cli, cli_model, cli_config, tmp_path: Path) -> None:
    model, tokenizer, config = cli_model, CharTokenizer(), cli_config(tmp_path / "store", mode="exact")
    said: list[str] = []
    first = run_chat(model, tokenizer, ["hello there", "and again"], session="talk", config=config,
                     max_new_tokens=8, system="sys", echo=said.append)  # fmt: skip
    assert "new" in said[0] and len(first) == 2
    assert first[1].conversation_tokens > first[0].conversation_tokens
    said.clear()
    second = run_chat(model, tokenizer, ["third"], session="talk", config=config, max_new_tokens=8, echo=said.append)
    assert f"resumed {first[1].conversation_tokens} tokens" in said[0], said[0]
    assert second[0].conversation_tokens == first[1].conversation_tokens + second[0].prompt_tokens + second[0].reply_tokens
    listed = cli("sessions", "show", "talk", "--store", str(tmp_path / "store"))
    assert f"tokens:      {second[0].conversation_tokens} " in listed.output, listed.output


def test_chat_refuses_bad_session_name_before_loading(cli) -> None:
    assert_clean_error(cli("chat", "--session", "a/b", input="hi\n"), "a/b")


@pytest.mark.slow
def test_chat_on_smollm2_two_runs(smollm2, tmp_path: Path) -> None:
    """The second run resumes the first and answers as one uninterrupted conversation would."""
    from hkv.sessions.store import SessionStore

    model, tokenizer = smollm2
    store = tmp_path / "store"
    config = hkv.Config.load(tiers={"path": str(store), "device": "64MiB", "host": "256MiB"}, attention={"mode": "exact"})
    said: list[str] = []
    first = run_chat(model, tokenizer, ["My name is Ada. Say OK."], session="ada", config=config, max_new_tokens=12, echo=said.append)
    said.clear()
    second = run_chat(model, tokenizer, ["What is my name?"], session="ada", config=config, max_new_tokens=12, echo=said.append)
    assert said[0].startswith(f"session 'ada': resumed {first[0].conversation_tokens} tokens"), said[0]
    with SessionStore.open(store, readonly=True) as opened:
        ids = torch.from_numpy(opened.get("ada").token_ids.astype("int64"))
    assert len(ids) == second[0].conversation_tokens
    assert "My name is Ada" in tokenizer.decode(ids[: first[0].conversation_tokens])
    n = second[0].reply_tokens
    with torch.inference_mode():  # the same conversation in one go, transformers' own cache
        plain = model.generate(ids[None, :-n], max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(plain[0, -n:], ids[-n:]) and plain.shape[1] == len(ids)
