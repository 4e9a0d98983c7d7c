"""``hkv sessions``: list, inspect, verify and delete the persistent sessions of a store, without a model."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..remote.client import RemoteStore
from ..sessions.repair import repair
from ..sessions.store import SessionStore
from ..store.maintenance import collect_garbage
from .common import HELP_MARKUP, ConfigOption, StoreOption, fail, human_bytes, load, table, user_errors

sessions_app = typer.Typer(
    help="List, inspect, verify and delete the persistent sessions of a store.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP
)


def _store_path(store: Path | None, config: Path | None) -> Path:
    return store if store is not None else Path(load(config).tiers.path)


@contextlib.contextmanager
def _open_store(path: Path, *, readonly: bool = True, exclusive: bool = False) -> Iterator[SessionStore]:
    """The :class:`~hkv.sessions.store.SessionStore` at ``path``, opened without a model."""
    if not path.is_dir():
        raise fail(f"no hkv store at {str(path)!r} (set --store or tiers.path in --config)")
    with user_errors():
        store = SessionStore.open(path, readonly=readonly, exclusive=exclusive)
        try:
            yield store
        finally:
            store.close()


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _remote_names(config: Path | None) -> list[str] | None:
    """Session names on the remote tier of ``--config`` (None: no remote tier, or it is down)."""
    if config is None:
        return None
    remote = load(config).remote
    if not remote.url:
        return None
    client = RemoteStore(remote)
    try:
        names = client.session_names()
    finally:
        client.close()
    if names is None:
        typer.echo(f"remote tier {remote.url} is unreachable: local sessions only", err=True)
    return names


@sessions_app.command("ls")
def sessions_ls(store: StoreOption = None, config: ConfigOption = None) -> None:
    """A table of the store's sessions, most recently used first (read without a model); with a
    --config naming a remote tier, where each session is (local, remote or both)."""
    path = _store_path(store, config)
    with _open_store(path) as opened, user_errors():
        infos = opened.list()
    remote = _remote_names(config)
    local = {info.name for info in infos}
    remote_only = sorted(set(remote or ()) - local)
    if not infos and not remote_only:
        typer.echo(f"no sessions in {path}")
        return
    headers = ("name", "tokens", "kv tokens", "blocks", "bytes", "shared", "model", "last used") + (("where",) if remote is not None else ())
    where = (lambda name: ("both" if name in remote else "local",)) if remote is not None else (lambda name: ())
    rows = []
    for info in infos:
        if info.tokens < 0:
            rows.append((info.name, "CORRUPT", "-", "-", "-", "-", f"run `hkv sessions verify {info.name}`", "-", *where(info.name)))
            continue
        rows.append((info.name, str(info.tokens), str(info.kv_tokens), str(info.kv_blocks * info.num_layers),
                     human_bytes(info.stored_bytes), str(info.shared_blocks), info.model, _when(info.last_used),
                     *where(info.name)))  # fmt: skip
    rows += [(name, "-", "-", "-", "-", "-", "-", "-", "remote") for name in remote_only]
    for line in table(headers, rows, right=(1, 2, 3, 4, 5)):
        typer.echo(line)


@sessions_app.command("show")
def sessions_show(
    name: Annotated[str, typer.Argument(help="session name")], store: StoreOption = None, config: ConfigOption = None
) -> None:
    """One session: tokens, blocks (on disk: no process holds them here), bytes, model, times."""
    with _open_store(_store_path(store, config)) as opened, user_errors():
        info = opened.info(name)
    blocks = info.kv_blocks * info.num_layers
    rows = [
        ("name", info.name),
        ("tokens", f"{info.tokens} ({info.kv_tokens} with stored KV)"),
        ("blocks", f"{blocks} on disk ({info.kv_blocks} per layer x {info.num_layers} layers), {info.shared_blocks} shared"
                   + (f", {info.missing_blocks} MISSING" if info.missing_blocks else "")),  # fmt: skip
        ("bytes", f"{info.stored_bytes} ({human_bytes(info.stored_bytes)})"),
        ("model", info.model),
        ("created", _when(info.created)),
        ("updated", _when(info.updated)),
        ("last used", _when(info.last_used)),
        ("commits", str(info.commits)),
    ]
    for label, value in rows:
        typer.echo(f"{label + ':':<12} {value}")


@sessions_app.command("rm")
def sessions_rm(
    name: Annotated[str, typer.Argument(help="session name")],
    store: StoreOption = None,
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Delete a session; blocks no other session references are freed."""
    with _open_store(_store_path(store, config), readonly=False) as opened, user_errors():
        info = opened.info(name)  # SessionNotFoundError before asking
        if not yes and sys.stdin.isatty() and not typer.confirm(f"delete session {name!r} ({info.tokens} tokens)?"):
            raise typer.Exit(1)
        result = opened.delete(name)
    typer.echo(f"deleted session {name!r}: {len(result.deleted)} blocks freed ({human_bytes(result.freed_bytes)})")


@sessions_app.command("verify")
def sessions_verify(
    name: Annotated[Optional[str], typer.Argument(help="session name (all sessions if omitted)")] = None,
    store: StoreOption = None,
    config: ConfigOption = None,
) -> None:
    """Re-check every checksum (records, tails, summaries, blocks); exit 1 listing any problem."""
    with _open_store(_store_path(store, config)) as opened, user_errors():
        report = opened.verify(name)
    if not report.ok:
        for session, problems in sorted(report.problems.items()):
            for problem in problems:
                typer.echo(f"{session}: {problem}")
        bad = sum(1 for problems in report.problems.values() if problems)
        raise fail(f"{bad} session(s) failed verification ({report.checked_blocks} blocks checked)")
    typer.echo(f"ok, {report.checked_blocks} blocks, {report.checked_bytes} bytes checked")


@sessions_app.command("gc")
def sessions_gc(store: StoreOption = None, config: ConfigOption = None) -> None:
    """Delete the blocks no session references (what a failed turn leaves, the prefix cache of
    store.persist); works on a full disk. Needs the store alone: no process may have it open."""
    with _open_store(_store_path(store, config), exclusive=True) as opened, user_errors():
        result = collect_garbage(opened.disk)
    typer.echo(f"gc: {result.deleted} unreferenced blocks deleted ({human_bytes(result.freed_bytes)} freed)")
    done = result.compaction
    if done.compacted or done.removed or done.skipped:
        typer.echo(f"gc: segment files: {done.compacted} compacted ({done.moved_records} records moved), {done.removed} unused "
                   f"deleted, {human_bytes(done.freed_bytes)} of files given back")  # fmt: skip
        for line in done.skipped:
            typer.echo(f"gc: {line}: left as it is")


@sessions_app.command("repair")
def sessions_repair(store: StoreOption = None, config: ConfigOption = None) -> None:
    """Check every record and rebuild the key index, usage and refs from them; drop what cannot
    be trusted (bad records; sessions whose record is unreadable; the KV, not the tokens, of
    sessions missing blocks), reporting each. Never deletes a record that checks out. Works on a
    full disk; needs the store alone."""
    with _open_store(_store_path(store, config), exclusive=True) as opened, user_errors():
        report = repair(opened)
    for line in report.problems:
        typer.echo(line)
    verdict = "nothing to repair" if report.ok else f"{len(report.problems)} problems fixed"
    typer.echo(f"repair: {report.checked_blocks} blocks checked, {verdict}")
