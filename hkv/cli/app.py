"""The ``hkv`` command: config checks, the demo, persistent chats, their sessions, benchmarks.

Heavy imports (transformers, the model, the store) happen inside the commands, so ``hkv config``
answers at once; ``hkv sessions`` (:mod:`.sessions`) and ``hkv bench`` (:mod:`.bench`) are
sub-apps.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import ConfigError
from .bench import bench_app
from .common import HELP_MARKUP, ConfigOption, JsonOption, StoreOption, fail, load, user_errors, write_json
from .sessions import sessions_app
from .tune import tune

app = typer.Typer(
    help="hkv: tiered, attention-guided KV cache for long contexts.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP
)
config_app = typer.Typer(
    help="Check and show configuration files.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP
)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(sessions_app, name="sessions")
app.command("tune")(tune)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="TOML config file")]) -> None:
    """Validate FILE (and HKV_* environment overrides); exit 2 with the problems if invalid."""
    load(file)
    typer.echo(f"{file}: ok")


@config_app.command("show")
def config_show(file: Annotated[Optional[Path], typer.Argument(help="TOML config file; defaults if omitted")] = None) -> None:
    """Print the effective config (defaults, FILE, then HKV_* environment) as TOML."""
    typer.echo(load(file).to_toml(), nl=False)


@app.command("chat")
def chat(
    session: Annotated[str, typer.Option("--session", "-s", help="session name: the conversation persists under it")],
    config: ConfigOption = None,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    system: Annotated[Optional[str], typer.Option(help="system prompt (first turn of a new session only)")] = None,
) -> None:
    """Chat with the default model (SmolLM2-135M-Instruct); the conversation persists in the store.

    Reads one user turn per line from stdin (an interactive prompt on a terminal). Running it
    again with the same --session resumes the conversation from the store instead of recomputing it.
    """
    from .chat import run_chat, stdin_lines
    from ..default_model import ModelNotInstalledError, load_default_model
    from ..sessions.records import check_name
    from ..tiers.manager import check_disk_budget

    cfg = load(config)
    try:
        check_disk_budget(cfg.tiers)  # before the model loads
    except ConfigError as error:
        raise fail(str(error), 2) from None
    with user_errors():
        check_name(session)  # before the model loads
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF conversion bars; hkv's own prefill bar stays
    try:
        model, tokenizer = load_default_model()
    except ModelNotInstalledError as error:
        raise fail(str(error)) from None
    tty = sys.stdout.isatty()
    with user_errors():
        run_chat(model, tokenizer, stdin_lines(), session=session, config=cfg, max_new_tokens=max_new_tokens,
                 system=system, echo=typer.echo, stream=tty)  # fmt: skip


@app.command("demo")
def demo(
    tokens: Annotated[int, typer.Option(min=128, help="passkey prompt length in tokens (first run only)")] = 4096,  # hkv.demo.DEFAULT_TOKENS
    config: ConfigOption = None,
    store: StoreOption = None,
    session: Annotated[str, typer.Option("--session", "-s", help="session the conversation is saved under")] = "demo",
    depth: Annotated[float, typer.Option(min=0.0, max=1.0, help="where the passkey sits in the prompt, 0 (start) to 1 (end)")] = 0.5,
    fresh: Annotated[bool, typer.Option("--fresh", help="delete the saved session first and start over")] = False,
    answer_tokens: Annotated[int, typer.Option(min=1, help="reply tokens to generate (more give a steadier decode figure)")] = 8,  # hkv.demo.ANSWER_TOKENS
    json_path: JsonOption = None,
) -> None:
    """The main job: a long passkey prompt on the default model, saved as a session a second run resumes.

    First run: prefill a passkey prompt of --tokens tokens (progress bar), answer it, print tier
    occupancy, prefetch statistics and timings, save the session. Later runs resume the session
    from the store and ask a follow-up question instead of prefilling again. Without --config the
    tier budgets, encodings and prefetch come from hkv tune's plan for this machine and --tokens
    (rates cached by hkv tune, else measured with quick probes), printed before the run.
    """
    from .demo import demo_config, drop_session, report_lines, resume_command, run_demo
    from ..default_model import ModelNotInstalledError, load_default_model
    from ..sessions.records import check_name
    from ..tiers.manager import check_disk_budget

    try:
        cfg = demo_config(load(config), store)
    except ConfigError as error:  # --store names a file
        raise fail(str(error), 2) from None
    if config is not None:
        try:
            check_disk_budget(cfg.tiers)  # before the model loads
        except ConfigError as error:
            raise fail(str(error), 2) from None
    with user_errors():
        check_name(session)  # before the model loads
        if fresh and drop_session(cfg, session):
            typer.echo(f"deleted session {session!r} from {cfg.tiers.path}")
    start = time.perf_counter()
    try:
        model, tokenizer = load_default_model()
    except ModelNotInstalledError as error:
        raise fail(str(error)) from None
    load_s = time.perf_counter() - start
    if config is None:
        from .demo_budgets import auto_demo_config

        try:
            cfg, lines = auto_demo_config(model, cfg, name=session, tokens=tokens)
            check_disk_budget(cfg.tiers)
        except ConfigError as error:
            raise fail(str(error)) from None
        for line in lines:
            typer.echo(line)
    with user_errors():
        result = run_demo(model, tokenizer, cfg, name=session, tokens=tokens, depth=depth, progress=True,
                          answer_tokens=answer_tokens)  # fmt: skip
    result.load_s = load_s
    for line in report_lines(result, resume=resume_command(session=session, store=store, config=config)):
        typer.echo(line)
    write_json(json_path, result.as_dict())


if __name__ == "__main__":  # pragma: no cover
    app()
