"""``--help`` of every ``hkv`` command reads as prose: each paragraph of a command's description is
reflowed to the terminal width, never cut where the docstring's source line happened to end."""

from __future__ import annotations


import pytest
from typer.testing import CliRunner

from hkv.cli.app import app

WIDTH = 100

COMMANDS = [
    [], ["demo"], ["chat"], ["config"], ["config", "check"], ["config", "show"],
    ["sessions"], ["sessions", "ls"], ["sessions", "show"], ["sessions", "rm"], ["sessions", "verify"],
    ["sessions", "gc"], ["sessions", "repair"], ["tune"],
    ["bench"], ["bench", "tiers"], ["bench", "decode"], ["bench", "passkey"], ["bench", "plot"], ["bench", "resume"], ["bench", "remote"], ["bench", "ruler"],
]  # fmt: skip

# A phrase of each help that must sit on one line at WIDTH columns. Those of demo and chat span a
# line break of their docstrings: "rich" help kept that break and cut the phrase.
PHRASES = {
    "": "tiered, attention-guided KV cache for long contexts",
    "demo": "Later runs resume the session from",
    "chat": "Running it again",
    "config": "Check and show configuration files",
    "config check": "exit 2 with the problems if invalid",
    "config show": "defaults, FILE, then HKV_* environment",
    "sessions": "verify and delete the persistent sessions",
    "sessions ls": "most recently used first",
    "sessions show": "no process holds them here",
    "sessions rm": "blocks no other session references are freed",
    "sessions verify": "exit 1 listing any problem",
    "sessions gc": "Delete the blocks no session references",
    "sessions repair": "Never deletes a record that checks out",
    "tune": "Measure this machine (free memory and disk",
    "bench": "with --json, write their figures",
    "bench tiers": "against plain copies and raw file I/O",
    "bench decode": "hkv sparse vs transformers' DynamicCache",
    "bench passkey": "Passkey accuracy of SmolLM2",
    "bench plot": "from its saved JSON (needs matplotlib)",
    "bench resume": "in a fresh process vs re-prefilling it",
    "bench remote": "Block reads from the remote tier (MGET, every record checked)",
    "bench ruler": "RULER-style tasks (several keys with distractors",
}


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH)
    assert result.exit_code == 0, result.output
    return result.output


def _description(text: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first panel, as lists of stripped lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:]:
        if line.lstrip().startswith(("╭", "+-")):
            break
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args) or "hkv")
def test_help_paragraphs_are_reflowed_not_cut(args: list[str]) -> None:
    text = _help(args)
    paragraphs = _description(text)
    assert paragraphs, text
    room = WIDTH - 2  # one column of margin either side
    for paragraph in paragraphs:
        for line, following in zip(paragraph, paragraph[1:]):
            next_word = following.split()[0]
            # a line ends early only where the next word would not have fitted on it
            assert len(line) + 1 + len(next_word) > room, f"line cut early: {line!r} then {next_word!r}\n{text}"
    flat = [" ".join(line.split()) for line in text.splitlines()]
    phrase = PHRASES[" ".join(args)]
    assert any(phrase in line for line in flat), f"{phrase!r} split across lines or missing:\n{text}"


def test_every_command_has_a_help_test() -> None:
    """A new command or sub-command must be added to COMMANDS (and PHRASES)."""
    import typer.main

    def walk(group, prefix):
        yield prefix
        for name, command in getattr(group, "commands", {}).items():
            yield from walk(command, [*prefix, name])

    found = {" ".join(path) for path in walk(typer.main.get_command(app), [])}
    assert found == {" ".join(args) for args in COMMANDS} == set(PHRASES)
