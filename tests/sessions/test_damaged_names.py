"""A session row whose key is not a valid session name (issue 16: a non-UTF-8 key made `ls` and
`verify` raise UnicodeDecodeError): it is listed and reported, the other sessions work."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from hkv.cli.app import app
from hkv.sessions.store import SessionStore
from hkv.tiers.disk import DiskTier

from helpers.records import LAYOUT, REC, ids_of, raw_env, save


def test_a_session_key_that_is_not_utf8_is_reported_not_raised(store_path: Path) -> None:
    disk = DiskTier(store_path, LAYOUT, 64 * REC, writer_batch=8)
    store = SessionStore(disk)
    save(store, "good", ids_of(9), 8)
    disk.close()
    env = raw_env(store_path)
    with env.begin(write=True) as txn:
        txn.put(b"s:\xff\xfebad", b"not a record", db=env.open_db(b"sessions", txn=txn))
    env.close()
    with SessionStore.open(store_path, readonly=False) as opened:
        assert opened.names() == ["good"]
        listed = {info.name: info for info in opened.list()}
        assert listed["good"].tokens == 9 and listed[repr(b"\xff\xfebad")].tokens == -1
        report = opened.verify()
        assert report.problems["good"] == [] and "is not a valid session name" in report.problems["(store)"][0]
        assert opened.reclaim(1, skip=set(), in_use=lambda key: False).sessions == ["good"]  # reclaim still works
    runner = CliRunner()
    listed = runner.invoke(app, ["sessions", "ls", "--store", str(store_path)])
    assert listed.exit_code == 0 and "good" in listed.output and "CORRUPT" in listed.output, listed.output
    verified = runner.invoke(app, ["sessions", "verify", "--store", str(store_path)])
    assert verified.exit_code == 1 and "(store): a session row whose name" in verified.output, verified.output
