"""The chat loop behind ``hkv chat``: a conversation on a wrapped model that persists in a session.

Each user turn is encoded on its own (the tokenizer's chat template applied to the NEW turn
only; the session holds every earlier token and its KV), appended to the session and answered
with greedy decoding; the session commits after every turn, so a later run (another process)
resumes the conversation where it stopped. Kept out of :mod:`hkv.cli` so that tests can drive
it with any model and tokenizer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from ..config import Config

# Used when the tokenizer has no chat template: a plain transcript.
PLAIN_USER, PLAIN_ASSISTANT = "User: ", "\nAssistant:"


@dataclass(slots=True)
class ChatTurn:
    """One answered turn. Times in seconds."""

    user: str
    reply: str
    prompt_tokens: int  # tokens of the new turn (template included)
    reply_tokens: int
    conversation_tokens: int  # the session's tokens after the reply
    seconds: float


class TurnEncoder:
    """Token ids of one new user turn, rendered with the tokenizer's chat template.

    The template is applied to a whole conversation, so the ids of turn ``k`` alone are the
    difference between the rendering of a conversation ending with that turn and the same
    conversation without it. ``system``: the system prompt, sent with the first turn only
    (None: the template's default, if it has one).
    """

    def __init__(self, tokenizer: Any, system: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system = system
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.eos_id = getattr(tokenizer, "eos_token_id", None)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _head(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system is not None else []

    def text(self, user: str, *, first: bool, previous_ended: bool = True) -> str:
        """The text of the new turn. ``previous_ended``: the conversation's last token is the
        end-of-turn token (False when the last reply was cut by max_new_tokens: it is closed here)."""
        if not self.templated:
            system = f"{self.system}\n" if first and self.system else ""
            return f"{system}{'' if first else chr(10)}{PLAIN_USER}{user}{PLAIN_ASSISTANT}"
        turn = {"role": "user", "content": user}
        if first:
            return self._render(self._head() + [turn], True)
        # A stand-in earlier exchange; only what the template adds after it is kept.
        before = self._head() + [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        rendered_before = self._render(before, False)
        rendered = self._render(before + [turn], True)
        if not rendered.startswith(rendered_before):  # a template that rewrites earlier turns
            raise ValueError("the tokenizer's chat template renders earlier turns differently once a turn is added")
        eos = self.tokenizer.eos_token or ""
        # What the template writes after the reply's end-of-turn token (SmolLM2: a newline).
        after_eos = rendered_before.rsplit(eos, 1)[1] if eos and eos in rendered_before else ""
        return ("" if previous_ended else eos) + after_eos + rendered[len(rendered_before) :]

    def ids(self, user: str, *, history: torch.Tensor) -> torch.Tensor:
        """``[1, S]`` int64 ids of the new turn; ``history``: the session's tokens ``[n]``."""
        first = history.numel() == 0
        ended = first or (self.eos_id is not None and int(history[-1]) == self.eos_id)
        text = self.text(user, first=first, previous_ended=ended)
        ids = self.tokenizer.encode(text, add_special_tokens=first and not self.templated)
        return torch.tensor([ids], dtype=torch.long)


def stdin_lines(stream: TextIO | None = None, *, prompt: str = "you> ") -> Iterator[str]:
    """User turns: one per line, blank lines skipped; an interactive prompt on a terminal."""
    stream = stream if stream is not None else sys.stdin
    if stream.isatty():
        while True:
            try:
                line = input(prompt)
            except EOFError:
                return
            if line.strip():
                yield line.strip()
    else:
        for line in stream:
            if line.strip():
                yield line.strip()


def describe_restore(name: str, restored: Any) -> str:
    """One line saying whether the session was resumed (and how fast) or is new."""
    if restored.new:
        return f"session {name!r}: new"
    pending = f", {restored.pending_tokens} to recompute" if restored.pending_tokens else ""
    return (
        f"session {name!r}: resumed {restored.tokens} tokens ({restored.kv_tokens} with stored KV{pending}) "
        f"in {restored.seconds:.2f} s"
    )


def run_chat(
    model: torch.nn.Module,
    tokenizer: Any,
    lines: Iterable[str],
    *,
    session: str,
    config: Config | None = None,
    max_new_tokens: int = 256,
    system: str | None = None,
    echo: Callable[[str], None] = print,
    progress: bool | None = None,
    stream: bool = False,
) -> list[ChatTurn]:
    """Answer each of ``lines`` in the persistent session ``session`` and return the turns.

    ``config``: hkv's config (its ``tiers.path`` is the store). ``echo`` gets the status line
    and each reply. ``progress``: the prefill progress bar (default: for long prompts).
    ``stream``: print the reply token by token (a terminal) instead of once it is complete.
    """
    from ..integrations.runtime import wrap

    encoder = TurnEncoder(tokenizer, system)
    turns: list[ChatTurn] = []
    with wrap(model, config) as rt, rt.session(session, tokenizer=tokenizer) as conversation:
        echo(describe_restore(session, conversation.restored))
        for user in lines:
            turns.append(_answer(conversation, encoder, user, max_new_tokens, echo, progress, stream))
    return turns


def _answer(conversation: Any, encoder: TurnEncoder, user: str, max_new_tokens: int, echo: Callable[[str], None],
            progress: bool | None, stream: bool) -> ChatTurn:  # fmt: skip
    tokenizer = encoder.tokenizer
    new_ids = encoder.ids(user, history=conversation.tokens)
    extra: dict[str, Any] = {}
    if stream:
        from transformers import TextStreamer

        extra["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if encoder.eos_id is not None:
        extra["pad_token_id"] = encoder.eos_id
    before = int(conversation.tokens.numel()) + int(new_ids.shape[1])  # the reply starts here
    start = time.perf_counter()
    out = conversation.generate(new_ids, max_new_tokens=max_new_tokens, do_sample=False, progress=progress, **extra)
    seconds = time.perf_counter() - start
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    total = int(sequences.shape[1])
    reply_ids = sequences[0, before:]
    reply = tokenizer.decode(reply_ids.tolist(), skip_special_tokens=True).strip()
    if not stream:
        echo(reply)
    return ChatTurn(user, reply, int(new_ids.shape[1]), int(reply_ids.numel()), total, seconds)
