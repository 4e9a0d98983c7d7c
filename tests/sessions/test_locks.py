"""Session locks (hkv.sessions.locks) across processes: a lock held by another process refuses the
session until that process dies; delete and reclaim hold the lock until their transaction is done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from hkv.sessions.records import SessionLockedError
from hkv.sessions.store import SessionStore

from helpers.records import ids_of, save


_HOLDER = """
import fcntl, os, sys, time, xxhash
fd = os.open(os.path.join(sys.argv[1], "sessions.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, xxhash.xxh3_64_intdigest(sys.argv[2].encode()) & (2**62 - 1))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_refuses_until_it_dies(store: SessionStore) -> None:
    save(store, "chat", ids_of(8), kv_tokens=8)
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store.path), "chat"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert store.is_locked("chat") and not store.is_locked("other")
        with pytest.raises(SessionLockedError, match="'chat'"):
            store.lock("chat")
        with pytest.raises(SessionLockedError, match="another process"):
            store.delete("chat")
        assert store.names() == ["chat"]
        with store.lock("other"):  # another name: another byte
            assert store.is_locked("other")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert not store.is_locked("chat")
        lock = store.lock("chat")
    finally:
        child.kill()
        child.wait(10)
    with pytest.raises(SessionLockedError):  # a second open in this process
        SessionStore(store.disk).lock("chat")
    lock.release()
    lock.release()  # idempotent
    assert not store.is_locked("chat")
    store.lock("chat").release()
    store.delete("chat")


_PROBE = """
import fcntl, os, sys, xxhash
fd = os.open(os.path.join(sys.argv[1], "sessions.lock"), os.O_RDWR | os.O_CREAT, 0o644)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, xxhash.xxh3_64_intdigest(sys.argv[2].encode()) & (2**62 - 1))
    print("locked")
except OSError:
    print("refused")
"""


def _probe(store: SessionStore, name: str) -> str:
    """Whether another process could take ``name``'s writer lock now."""
    child = subprocess.run([sys.executable, "-c", _PROBE, str(store.path), name], capture_output=True, text=True, timeout=60)
    return child.stdout.strip()


def _queued(store: SessionStore, n: int) -> None:
    """Wait until the queue of the writer's commit thread holds ``n`` jobs."""
    for _ in range(1000):
        writer = store.disk._writer
        past_prepare = writer._ready is writer._jobs or writer._jobs.qsize() == 0
        if past_prepare and writer._ready.qsize() == n:  # waiting to commit
            return
        threading.Event().wait(0.01)
    raise AssertionError("the job was not queued")


def test_delete_and_reclaim_hold_the_writer_lock_until_their_transaction_is_done(store: SessionStore) -> None:
    """Else another process could open the session (reading the old record) between the lock
    check and the commit, and then use blocks the delete / reclaim frees."""
    save(store, "chat", ids_of(8), kv_tokens=8)
    save(store, "old", ids_of(8, 100), kv_tokens=8)
    for call, name in [(lambda: store.delete("chat"), "chat"), (lambda: store.reclaim(1, skip=set(), in_use=lambda k: False), "old")]:
        first, second = threading.Event(), threading.Event()
        blocker = store.disk.submit_apply(lambda txn: first.wait(30))
        _queued(store, 0)
        results: list[object] = []
        worker = threading.Thread(target=lambda: results.append(call()))
        worker.start()
        _queued(store, 1)
        after = store.disk.submit_apply(lambda txn: second.wait(30))  # in the batch of the call's job
        _queued(store, 2)  # both passed the prepare thread: the writer gathers them together
        first.set()
        _queued(store, 0)  # the writer took the call's job and `after` in one batch
        threading.Event().wait(0.5)  # the call's job has run; its transaction waits for `after`
        try:
            assert _probe(store, name) == "refused"
        finally:
            second.set()
            worker.join(30)
            blocker.result(), after.result()
        assert results and _probe(store, name) == "locked" and not store.is_locked(name)
    assert store.names() == ["old"] and store.get("old").kv_tokens == 0
