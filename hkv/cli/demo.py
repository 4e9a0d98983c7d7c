"""The logic behind ``hkv demo``: a long passkey prompt through the runtime, saved as a session
that the next run resumes instead of prefilling.

First run (no session ``name`` in the store): build a passkey prompt of about ``tokens`` tokens
(:func:`hkv.passkey.passkey_prompt`), stream it into the session with a progress bar, answer the
question greedily, commit. Later runs: open the session (lazily restored from the store: block
data stays on disk until attention needs it), ask a follow-up question in a new turn, commit.

Kept out of :mod:`hkv.cli` so that tests drive it with any model and tokenizer;
:func:`run_demo` returns a :class:`DemoResult` and :func:`report_lines` renders it.
A small JSON file in the store folder (``demo.json``, one entry per session name: the passkey
and the first run's prefill figures) lets a later run compare its resume time with them.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..passkey import passkey_answer, passkey_prompt
from .common import human_bytes

DEFAULT_TOKENS = 4096  # about two minutes on a 2-core CPU with SmolLM2-135M (model load included)
DEFAULT_SESSION = "demo"
ANSWER_TOKENS = 8  # new tokens per answer: a space, the 5 digits, a little more
RECORD_FILE = "demo.json"  # in the store folder; keys are session names (never paths)
FOLLOW_UP = "\nWhat was the pass key again? The pass key is"
_NEEDLE = re.compile(r"The pass key is (\d+)\. Remember it\.")


@dataclass(slots=True)
class TierUse:
    """One tier's occupancy after the run (payload bytes)."""

    name: str
    used_bytes: int
    capacity_bytes: int
    blocks: int


@dataclass(slots=True)
class PrefetchFigures:
    """The session sequence's prefetch figures over this run (block counts, seconds, bytes).

    Every block the attention read is in exactly one bucket (:class:`hkv.attention.stats.StepStats`):
    ``read_blocks = pinned_blocks + hit_blocks + unpredicted_blocks + waited_blocks +
    on_demand_blocks``. ``pinned_blocks``: sink / local blocks (pinned on the device);
    ``hit_blocks``: predicted by the prefetch and on the device when read; ``unpredicted_blocks``:
    on the device when read without having been predicted for that read; ``waited_blocks``:
    still being promoted when read (waited for); ``on_demand_blocks``: fetched on demand
    (misses). ``needed_blocks = read_blocks - pinned_blocks``.

    ``hit_rate``: ``hit_blocks / needed_blocks`` (None when no block was read from outside the
    pinned sink / local window). ``promoted_blocks``: blocks the prefetcher queued for promotion
    (it skips those already on the device). ``attend_s``: time in hkv's attention (prefill and
    decode, every layer); ``select_s``: the part of it spent choosing blocks (scoring their
    summaries).
    """

    hit_rate: float | None
    needed_blocks: int
    hit_blocks: int
    on_demand_blocks: int
    promoted_blocks: int
    stall_s: float
    moved_bytes: dict[str, int]
    attend_s: float
    select_s: float
    read_blocks: int = 0
    pinned_blocks: int = 0
    unpredicted_blocks: int = 0
    waited_blocks: int = 0
    predicted_blocks: int = 0  # blocks the prefetch predicted (asked the prefetcher for), over every step
    enabled: bool = True  # prefetch.enabled: with it off, nothing is predicted and the hit rate is 0

    @property
    def buckets(self) -> dict[str, int]:
        """The blocks read by bucket (they sum to ``read_blocks``)."""
        return {"pinned": self.pinned_blocks, "hit": self.hit_blocks, "unpredicted": self.unpredicted_blocks,
                "waited": self.waited_blocks, "fetched": self.on_demand_blocks}  # fmt: skip


@dataclass(slots=True)
class DemoResult:
    """What one ``hkv demo`` run did and measured. Times in seconds, sizes in tokens / bytes."""

    session: str
    store: str
    resumed: bool  # True when the session existed and was restored instead of prefilled
    key: str  # the passkey hidden in the prompt
    question: str  # the text of the question asked in this run
    answer: str  # the digits the model produced
    reply: str  # the decoded reply
    found: bool  # answer == key
    conversation_tokens: int  # the session's tokens after this run
    turn_tokens: int  # tokens added this run: the passkey prompt, or the follow-up turn
    restored_kv_tokens: int  # tokens whose KV came from the store (0 on a first run)
    pending_tokens: int  # restored tokens whose KV was missing from the store and was recomputed
    prefilled_tokens: int  # tokens whose KV the prefill computed (the new tokens but the last two: generate does those)
    restore_s: float  # opening the session (0 on a first run: nothing to restore)
    prefill_s: float  # computing the KV of the new tokens but the last
    reply_tokens: int
    decode_s: float  # model.generate: the last prompt token's forward and every reply token
    commit_s: float
    first_token_s: float | None  # generate's start to the first reply token (the forward of the prompt's last tokens yields it)
    step_ms: list[float]  # milliseconds between consecutive reply tokens after the first (one decode step each)
    first_prefill_tokens: int | None  # from the run that created the session (None if unknown)
    first_prefill_s: float | None
    tiers: list[TierUse] = field(default_factory=list)
    prefetch: PrefetchFigures | None = None
    load_s: float | None = None  # model load, filled by the caller that loaded it

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 and self.prefilled_tokens else None

    @property
    def decode_ms_per_token(self) -> float | None:
        return 1000 * self.decode_s / self.reply_tokens if self.reply_tokens else None

    @property
    def step_ms_median(self) -> float | None:
        """Median of :attr:`step_ms`: the decode step once the reply is under way."""
        return statistics.median(self.step_ms) if self.step_ms else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        out["decode_ms_per_token"] = self.decode_ms_per_token
        out["step_ms_median"] = self.step_ms_median
        if self.prefetch is not None:
            out["prefetch"]["buckets"] = self.prefetch.buckets  # the blocks read, each in one bucket
        return out


# -- configuration and the demo record -----------------------------------------------------------


def demo_config(config: Config | None = None, store: str | Path | None = None) -> Config:
    """``config`` (defaults if None) with ``tiers.path`` set to ``store`` when given."""
    config = config if config is not None else Config.load()
    if store is None:
        return config
    return Config.load(config, env={}, tiers={"path": str(store)})  # env already applied to config


def _record_path(config: Config) -> Path:
    return Path(config.tiers.path) / RECORD_FILE


def read_record(config: Config, name: str) -> dict[str, Any]:
    """The demo's notes on session ``name`` (``key``, ``prefill_tokens``, ``prefill_s``), {} if none."""
    path = _record_path(config)
    try:
        notes = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    entry = notes.get(name) if isinstance(notes, dict) else None
    return entry if isinstance(entry, dict) else {}


def write_record(config: Config, name: str, entry: dict[str, Any] | None) -> None:
    """Set (or with None, drop) the notes on session ``name`` (creates the store folder if needed)."""
    path = _record_path(config)
    try:
        notes = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        notes = {}
    if not isinstance(notes, dict):
        notes = {}
    if entry is None:
        notes.pop(name, None)
    else:
        notes[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(notes, indent=2) + "\n")


def drop_session(config: Config, name: str) -> bool:
    """Delete session ``name`` from the store (``--fresh``); False when there was none.

    Run it before wrapping the model: the store is opened on its own, like ``hkv sessions rm``."""
    from ..sessions import SessionNotFoundError, SessionStore
    from ..sessions.records import check_name

    check_name(name)
    path = Path(config.tiers.path)
    if not path.is_dir():
        return False
    write_record(config, name, None)
    store = SessionStore.open(path, readonly=False)
    try:
        store.delete(name)
    except SessionNotFoundError:
        return False
    finally:
        store.close()
    return True


class StepClock:
    """A ``generate(streamer=...)`` that only notes when each chunk of tokens arrives
    (``time.perf_counter`` seconds): first the prompt, then one reply token per decode step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def reply_times(self, start: float) -> tuple[float | None, list[float]]:
        """(seconds from ``start`` to the first reply token, milliseconds between the later ones)."""
        reply = self.times[1:]  # times[0]: generate hands the prompt to the streamer first
        if not reply:
            return None, []
        return reply[0] - start, [1000 * (b - a) for a, b in zip(reply, reply[1:])]


# -- the runs --------------------------------------------------------------------------------------


def run_demo(
    model: torch.nn.Module,
    tokenizer: Any,
    config: Config,
    *,
    name: str = DEFAULT_SESSION,
    tokens: int = DEFAULT_TOKENS,
    depth: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    answer_tokens: int = ANSWER_TOKENS,
) -> DemoResult:
    """One demo run on ``model`` with ``config`` (the store is ``config.tiers.path``).

    Opens session ``name``: new -> :func:`_first_turn` (``tokens``, ``depth``, ``seed`` shape the
    passkey prompt); existing -> :func:`_follow_up_turn` (they are ignored). Commits before returning.
    """
    from ..integrations.runtime import wrap

    with wrap(model, config) as rt:
        start = time.perf_counter()
        with rt.session(name, tokenizer=tokenizer, autocommit=False) as session:
            restore_s = time.perf_counter() - start
            resumed = not session.restored.new and session.tokens.numel() > 0
            if resumed:
                result = _follow_up_turn(session, tokenizer, config, name, restore_s=restore_s,
                                         progress=progress, answer_tokens=answer_tokens)  # fmt: skip
            else:
                result = _first_turn(session, tokenizer, config, name, tokens=tokens, depth=depth, seed=seed,
                                     progress=progress, answer_tokens=answer_tokens)  # fmt: skip
            result.tiers = tier_use(rt)
            result.prefetch = prefetch_figures(rt)
    return result


def _first_turn(session: Any, tokenizer: Any, config: Config, name: str, *, tokens: int, depth: float, seed: int,
                progress: bool, answer_tokens: int) -> DemoResult:
    """Prefill a passkey prompt into the new session, answer it, commit, note the figures."""
    ids, key = passkey_prompt(tokenizer, n_tokens=tokens, depth=depth, seed=seed)
    turn = torch.tensor([ids], dtype=torch.long)
    result = _answer(session, tokenizer, turn, key=key, question=_question_text(tokenizer, ids),
                     progress=progress, answer_tokens=answer_tokens)  # fmt: skip
    result.session, result.store, result.resumed = name, str(config.tiers.path), False
    result.first_prefill_tokens, result.first_prefill_s = result.prefilled_tokens, result.prefill_s
    write_record(config, name, {"key": key, "prefill_tokens": result.prefilled_tokens, "prefill_s": result.prefill_s})
    return result


def _follow_up_turn(session: Any, tokenizer: Any, config: Config, name: str, *, restore_s: float, progress: bool,
                    answer_tokens: int) -> DemoResult:
    """Ask :data:`FOLLOW_UP` in a new turn of the restored session, answer it, commit."""
    record = read_record(config, name)
    key = str(record.get("key") or find_key(tokenizer, session.tokens))
    turn = torch.tensor([tokenizer.encode(FOLLOW_UP, add_special_tokens=False)], dtype=torch.long)
    # a short turn: a bar only when blocks gone from the store must be recomputed (the session's auto rule)
    result = _answer(session, tokenizer, turn, key=key, question=FOLLOW_UP.strip(),
                     progress=None if progress else False, answer_tokens=answer_tokens)  # fmt: skip
    result.session, result.store, result.resumed = name, str(config.tiers.path), True
    result.restore_s = restore_s
    result.pending_tokens = int(session.restored.pending_tokens)
    result.first_prefill_tokens = record.get("prefill_tokens")
    result.first_prefill_s = record.get("prefill_s")
    return result


def _answer(session: Any, tokenizer: Any, turn: torch.Tensor, *, key: str, question: str, progress: bool | None,
            answer_tokens: int) -> DemoResult:
    """Append ``turn`` ``[1, S]`` but its last token (timed: the prefill), generate the reply
    greedily from the last token (timed: the decode), commit (timed)."""
    restored_kv = session.kv_tokens
    start = time.perf_counter()
    if turn.shape[1] > 1:
        session.append(turn[:, :-1], progress=progress)
    prefill_s = time.perf_counter() - start
    computed = session.kv_tokens - restored_kv
    before = session.tokens.numel() + 1  # the conversation once the turn's last token is in
    clock = StepClock()
    start = time.perf_counter()
    out = session.generate(turn[:, -1:], max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, do_sample=False,
                           progress=False, streamer=clock)  # fmt: skip
    decode_s = time.perf_counter() - start
    first_token_s, step_ms = clock.reply_times(start)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    reply_ids = sequences[0, before:].tolist()
    start = time.perf_counter()
    session.commit()
    commit_s = time.perf_counter() - start
    answer = passkey_answer(tokenizer, reply_ids)
    return DemoResult(
        session="", store="", resumed=False, key=key, question=question, answer=answer,
        reply=tokenizer.decode(reply_ids, skip_special_tokens=True), found=answer == key,
        conversation_tokens=int(session.tokens.numel()), turn_tokens=int(turn.shape[1]),
        restored_kv_tokens=int(restored_kv), pending_tokens=0, prefilled_tokens=int(computed), restore_s=0.0, prefill_s=prefill_s,
        reply_tokens=len(reply_ids), decode_s=decode_s, commit_s=commit_s, first_token_s=first_token_s, step_ms=step_ms,
        first_prefill_tokens=None, first_prefill_s=None,
    )  # fmt: skip


def _question_text(tokenizer: Any, ids: list[int]) -> str:
    """The question at the end of a passkey prompt (its last line)."""
    return tokenizer.decode(ids[-16:]).rsplit("\n", 1)[-1].strip()


def find_key(tokenizer: Any, token_ids: torch.Tensor) -> str:
    """The passkey stated in a conversation (``token_ids`` ``[n]``), "" if none."""
    match = _NEEDLE.search(tokenizer.decode(token_ids.tolist(), skip_special_tokens=True))
    return match.group(1) if match else ""


# -- figures ----------------------------------------------------------------------------------------


def tier_use(rt: Any) -> list[TierUse]:
    """Bytes, capacity and blocks per tier (device, host, disk) from ``rt.stats()``."""
    tiers = rt.stats().tiers
    return [TierUse(name, u["used_bytes"], u["capacity_bytes"], u["blocks"]) for name, u in tiers.items()]


def prefetch_figures(rt: Any) -> PrefetchFigures | None:
    """The current (or last) sequence's prefetch figures plus the prefetcher's promotions."""
    stats = rt.stats()
    seq = stats.prefetch
    if seq is None:
        return None
    promoted = rt.prefetcher.stats().submitted_blocks if rt.prefetcher is not None else 0
    return PrefetchFigures(
        hit_rate=seq.hit_rate, needed_blocks=seq.needed, hit_blocks=seq.hit, on_demand_blocks=seq.fetched,
        promoted_blocks=promoted, stall_s=seq.stall_s, moved_bytes=dict(stats.moved_bytes), attend_s=seq.attend_s,
        select_s=seq.select_s, read_blocks=seq.read, pinned_blocks=seq.pinned, unpredicted_blocks=seq.unpredicted,
        waited_blocks=seq.waited, predicted_blocks=seq.predicted, enabled=rt.prefetcher is not None,
    )  # fmt: skip


# -- rendering ----------------------------------------------------------------------------------------


def resume_command(*, session: str = DEFAULT_SESSION, store: str | Path | None = None,
                   config: str | Path | None = None) -> str:
    """The ``hkv demo`` command line that resumes session ``session``: the options a run was
    given that decide where the session lives (``--config``, ``--store``, ``--session``), quoted
    for a POSIX shell; ``hkv demo`` alone for the defaults."""
    words = ["hkv", "demo"]
    if config is not None:
        words += ["--config", str(config)]
    if store is not None:
        words += ["--store", str(store)]
    if session != DEFAULT_SESSION:
        words += ["--session", session]
    return shlex.join(words)


def report_lines(result: DemoResult, *, resume: str | None = None) -> list[str]:
    """What ``hkv demo`` prints after a run, one line per entry. ``resume``: the command that
    resumes the session (:func:`resume_command`, named in the first run's last line); by
    default ``hkv demo`` with ``--session`` when it is not the default one."""
    r = result
    resume = resume if resume is not None else resume_command(session=r.session or DEFAULT_SESSION)
    lines = [_headline(r), f"question: {r.question}", f"answer:   {r.reply.strip()!r}"]
    verdict = "FOUND" if r.found else "NOT found"
    lines.append(f"passkey {r.key}: {verdict} (model answered {r.answer or 'no digits'})")
    lines.append("tiers (used / capacity):")
    for tier in r.tiers:
        share = f"{100 * tier.used_bytes / tier.capacity_bytes:5.1f}%" if tier.capacity_bytes else "    -"
        lines.append(f"  {tier.name:<7} {human_bytes(tier.used_bytes):>10} / {human_bytes(tier.capacity_bytes):>10}  {share}  {tier.blocks} blocks")
    lines.extend(_prefetch_lines(r.prefetch))
    lines.extend(_timing_lines(r, resume))
    return lines


def _headline(r: DemoResult) -> str:
    if r.resumed:
        missing = f" ({r.pending_tokens} more recomputed: their blocks had left the store)" if r.pending_tokens else ""
        return (f"session {r.session!r} in {r.store}: resumed {r.restored_kv_tokens} tokens of KV from the store{missing}; "
                f"new turn of {r.turn_tokens} tokens, conversation now {r.conversation_tokens} tokens")  # fmt: skip
    return (f"session {r.session!r} in {r.store}: new; passkey prompt of {r.turn_tokens} tokens, "
            f"{r.prefilled_tokens} prefilled")  # fmt: skip


def _prefetch_lines(p: PrefetchFigures | None) -> list[str]:
    if p is None:
        return ["prefetch: no sequence statistics"]
    beyond = "blocks read beyond the pinned sink/local ones"
    if not p.enabled:
        head = f"off (prefetch.enabled = false); {p.needed_blocks} {beyond}"
    elif p.hit_rate is not None:
        head = f"hit rate {100 * p.hit_rate:.1f}% = {p.hit_blocks} / {p.needed_blocks} {beyond}; {p.promoted_blocks} promoted ahead"
    else:
        head = f"hit rate n/a (no {beyond}); {p.promoted_blocks} promoted ahead"
    moved = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(p.moved_bytes.items()) if v) or "nothing"
    return [
        f"prefetch: {head}, stall {p.stall_s:.3f} s",
        f"reads:    {p.read_blocks} blocks = {p.pinned_blocks} pinned + {p.hit_blocks} predicted, on the device in time"
        f" + {p.unpredicted_blocks} on the device, not predicted + {p.waited_blocks} waited for"
        f" + {p.on_demand_blocks} fetched on demand",
        f"attention {p.attend_s:.2f} s, of which choosing blocks {p.select_s:.2f} s",
        f"moved:    {moved}",
    ]


def _timing_lines(r: DemoResult, resume: str) -> list[str]:
    lines = []
    if r.load_s is not None:
        lines.append(f"model load     {r.load_s:7.2f} s")
    if r.resumed:
        lines.append(f"resume         {r.restore_s:7.2f} s  (session opened, {r.restored_kv_tokens} tokens of KV restored lazily)")
    rate = f"{r.prefill_tokens_per_s:.0f} tok/s" if r.prefill_tokens_per_s else "-"
    lines.append(f"prefill        {r.prefill_s:7.2f} s  ({r.prefilled_tokens} tokens, {rate})")
    per_token = f"{r.decode_ms_per_token:.0f} ms/token" if r.decode_ms_per_token else "-"
    steps = ""
    if r.first_token_s is not None:
        steps = f"; first token {1000 * r.first_token_s:.0f} ms"
        if r.step_ms_median is not None:
            steps += f", then {r.step_ms_median:.0f} ms per step (median of {len(r.step_ms)})"
    lines.append(f"decode         {r.decode_s:7.2f} s  ({r.reply_tokens} tokens, {per_token}{steps})")
    lines.append(f"commit         {r.commit_s:7.2f} s")
    if r.resumed and r.first_prefill_s:
        here = r.restore_s + r.prefill_s
        lines.append(
            f"resume + new-turn prefill {here:.2f} s vs the first run's prefill {r.first_prefill_s:.2f} s "
            f"({r.first_prefill_tokens} tokens): {r.first_prefill_s / max(here, 1e-9):.0f}x faster"
        )
    elif not r.resumed:
        lines.append(f"saved as session {r.session!r}; run `{resume}` again to resume it (--fresh starts over)")
    return lines
