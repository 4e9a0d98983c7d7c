"""Linux native AIO reads (hkv.store.linux_aio) and the segment reads built on them: the bytes of
every range as a plain read gives them, at a file's end, in batches larger than a context, from
several threads; a wait interrupted leaves nothing in flight; a filesystem that refuses O_DIRECT
sends the store back to the page cache with the same results. The store's read tests run on
both paths (tests/store/test_segments.py)."""

from __future__ import annotations

import errno
import mmap
import os
import random
import threading
from pathlib import Path

import pytest
import torch

from hkv.blocks import BlockKey, BlockLayout
from hkv.store import linux_aio, segment_reads
from hkv.store.linux_aio import AioReader, Request
from hkv.tiers.disk import DiskTier

LAYOUT = BlockLayout(kv_heads=1, block_tokens=16, head_dim=64, dtype=torch.float16)

pytestmark = pytest.mark.skipif(linux_aio.probe() is None, reason="Linux native AIO not available here")


def _direct_fd(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip(f"O_DIRECT refused on {path.parent}")


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(random.Random(0).randbytes(3 * 2**20 + 1234))  # not a whole number of pages
    return path


def test_reads_give_the_bytes_a_plain_read_gives(data_file: Path) -> None:
    fd, size = _direct_fd(data_file), data_file.stat().st_size
    rng = random.Random(1)
    requests = [Request(fd, rng.randrange(0, size - 70_000), rng.randrange(1, 70_000)) for _ in range(150)]  # > DEPTH
    requests += [Request(fd, size - 100, 500), Request(fd, size + 8192, 10)]  # across the end, past it
    reader = AioReader(depth=64)
    try:
        views = reader.read(requests)
        data = data_file.read_bytes()
        assert [bytes(v) for v in views] == [data[r.offset : r.offset + r.length] for r in requests]
        assert len(views[-2]) == 100 and len(views[-1]) == 0
        assert reader.reads == len(requests) and reader.submits >= 3  # 152 requests: three rounds of 64
    finally:
        reader.close()
        os.close(fd)
    with pytest.raises(ValueError, match="closed"):
        reader.read(requests[:1])


def test_threads_read_at_once_each_into_its_own_buffer(data_file: Path) -> None:
    fd, size = _direct_fd(data_file), data_file.stat().st_size
    data = data_file.read_bytes()
    reader = AioReader()
    wrong: list[int] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            requests = [Request(fd, rng.randrange(0, size - 50_000), 49_216) for _ in range(16)]
            views = reader.read(requests)
            wrong.extend(i for i, (r, v) in enumerate(zip(requests, views)) if bytes(v) != data[r.offset : r.offset + r.length])

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        reader.close()
        os.close(fd)
    assert wrong == [] and reader.reads == 4 * 20 * 16
    assert not reader._states  # closed: every context destroyed


def test_the_contexts_of_threads_that_ended_are_destroyed(data_file: Path) -> None:
    fd = _direct_fd(data_file)
    reader = AioReader()
    try:
        for _ in range(5):
            thread = threading.Thread(target=lambda: reader.read([Request(fd, 0, 4096)]))
            thread.start()
            thread.join()
        assert len(reader._states) == 2  # this thread's and the last one's; the four before were destroyed
    finally:
        reader.close()
        os.close(fd)


def test_an_interrupted_wait_leaves_no_request_in_flight(data_file: Path, monkeypatch) -> None:
    fd = _direct_fd(data_file)
    reader = AioReader()
    real = reader._kernel.getevents
    state = reader._state()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(reader._kernel, "getevents", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            reader.read([Request(fd, 0, 4096 * 8)])
        assert state not in reader._states.values()  # its context destroyed: the kernel waited for the request
        monkeypatch.setattr(reader._kernel, "getevents", real)
        (view,) = reader.read([Request(fd, 100, 5000)])  # a new context serves the next read
        assert bytes(view) == data_file.read_bytes()[100:5100]
    finally:
        reader.close()
        os.close(fd)


def test_a_bad_descriptor_is_an_os_error(data_file: Path) -> None:
    reader = AioReader()
    try:
        with pytest.raises(OSError):
            reader.read([Request(987654, 0, 4096)])
    finally:
        reader.close()


@pytest.mark.parametrize("refused", ["at open", "at read"])
def test_a_filesystem_refusing_o_direct_sends_reads_back_to_the_page_cache(tmp_path: Path, monkeypatch, refused: str) -> None:
    """tmpfs before Linux 6.6, some network filesystems: EINVAL opening with O_DIRECT or reading."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT and flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    def refusing_read(self, requests, ready):
        raise OSError(errno.EINVAL, "Invalid argument")

    keys = [BlockKey(i.to_bytes(16, "little")) for i in range(8)]
    blocks = torch.randn(8, *LAYOUT.shape).to(LAYOUT.dtype)
    with DiskTier(tmp_path / "store", LAYOUT, 64 * LAYOUT.record_nbytes) as tier:
        tier.put_many(keys, blocks)
        if refused == "at open":
            monkeypatch.setattr(segment_reads.os, "open", refusing_open)
        else:
            monkeypatch.setattr(AioReader, "read_each", refusing_read)
        out = torch.empty_like(blocks)
        tier.get_many_into(keys[::-1], out)
        reader = tier.segment_reader
        assert reader.aio is None and len(reader._retired) == 1  # given up at the first batch, the page cache served
        tier.get_many_into(keys, out)
    assert torch.equal(out, blocks)


def test_what_the_callback_raises_propagates_and_the_reader_reads_on(data_file: Path) -> None:
    fd = _direct_fd(data_file)
    reader = AioReader()
    requests = [Request(fd, i * 50_000, 49_216) for i in range(20)]
    seen: list[int] = []

    def ready(i: int, view: memoryview) -> None:
        seen.append(i)
        if len(seen) == 3:
            raise ValueError("a corrupt record")

    try:
        with pytest.raises(ValueError, match="corrupt"):
            reader.read_each(requests, ready)
        assert len(seen) == 3
        views = reader.read(requests)
        data = data_file.read_bytes()
        assert [bytes(v) for v in views] == [data[r.offset : r.offset + r.length] for r in requests]
    finally:
        reader.close()
        os.close(fd)


def test_a_thread_refused_an_aio_context_reads_through_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    """io_setup fails with EAGAIN once the system's aio-max-nr events are taken: that thread's
    batch goes through the page cache, and AIO stays on for the store."""
    keys = [BlockKey(i.to_bytes(16, "little")) for i in range(8)]
    blocks = torch.randn(8, *LAYOUT.shape).to(LAYOUT.dtype)
    with DiskTier(tmp_path / "store", LAYOUT, 64 * LAYOUT.record_nbytes) as tier:
        tier.put_many(keys, blocks)
        aio = tier.segment_reader.aio
        assert aio is not None

        def refused(depth):
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

        monkeypatch.setattr(aio._kernel, "setup", refused)
        out = torch.empty_like(blocks)
        thread = threading.Thread(target=lambda: tier.get_many_into(keys, out))  # a thread without a context yet
        thread.start()
        thread.join()
        assert torch.equal(out, blocks) and tier.segment_reader.aio is aio and aio.reads == 0


def test_a_payload_on_a_512_byte_boundary_goes_straight_into_an_aligned_buffer(data_file: Path) -> None:
    fd = _direct_fd(data_file)
    data = data_file.read_bytes()
    rows = memoryview(mmap.mmap(-1, 1 << 20))  # page-aligned
    payload = 8 * 512
    requests = [Request(fd, 4096 + 512 * (3 + 20 * k) - 64, 64 + payload, into=rows[k * payload : (k + 1) * payload]) for k in range(6)]
    end_payload = (len(data) - 1000) // 512 * 512  # aligned, the file ending inside the payload
    requests.append(Request(fd, end_payload - 64, 64 + payload, into=rows[6 * payload : 7 * payload]))
    requests.append(Request(fd, 4096 + 512 * 300 - 64, 64 + payload, into=rows[7 * payload + 64 : 8 * payload + 64]))  # unaligned row
    reader = AioReader()
    got: dict[int, bytes] = {}
    try:
        reader.read_each(requests, lambda i, view: got.__setitem__(i, bytes(view)))
    finally:
        reader.close()
        os.close(fd)
    for i, request in enumerate(requests[:6]):
        assert got[i] == data[request.offset : request.offset + 64]  # the header alone: the payload is in the row
        assert bytes(request.into) == data[request.offset + 64 : request.offset + request.length]
    assert got[6] == data[requests[6].offset :]  # short: the record as far as the file goes, in one piece
    assert got[7] == data[requests[7].offset : requests[7].offset + requests[7].length]  # read whole, into ignored
    assert reader.straight == 7
