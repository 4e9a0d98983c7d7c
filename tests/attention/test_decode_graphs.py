"""A decode step that reads the whole fresh window with its unwritten end masked (on a GPU, so
that a resident layer's read keeps its shapes between block boundaries), and its CUDA graphs
(hkv/attention/decode_graphs.py): the same bits whether replayed, run eagerly or read through
the host path, and no device -> host synchronisation in a replay or a capture."""

from __future__ import annotations

import pytest
import torch

import hkv.attention.sequence
from hkv.config import Config
from hkv.positions import RotaryShift

from helpers.sequences import HKV, LAYERS, D, Driver, attend_without_syncs, make_config, opened_sequence

ROTARY = RotaryShift(torch.tensor([1.0, 0.3, 0.05, 0.002], dtype=torch.float64))  # all 8 dims of D rotate


def _config(path, mode: str, device_blocks: int) -> Config:
    """4-token blocks, sink 4, local 8, budget 24 tokens (sparse, remap) or exact."""
    config = make_config(path, mode="exact" if mode == "exact" else "sparse", sink=4, local=8, budget=24,
                         device_blocks=device_blocks, host_blocks=40)  # fmt: skip
    return Config.load(config, attention={"positions": "remap" if mode == "remap" else "original"}, env={})


def _outputs(config, *, device: str, dtype: torch.dtype, tables: bool = True, padded: bool | None = None,
             steps: int = 14) -> tuple[list[torch.Tensor], object, object]:  # fmt: skip
    """Every layer's output of a 37-token prefill and ``steps`` decode steps (4-token blocks: one
    sealed every 4 steps), the stats and the sequence's graphs. ``padded``: force the padded read
    (None: the device's choice)."""
    rotary = ROTARY if config.attention.positions == "remap" else None
    with opened_sequence(config, device=device, dtype=dtype, rotary=rotary) as (manager, seq):
        seq._table_reads = tables
        if padded is not None:
            seq._padded = padded
        driver = Driver(seq, manager, seed=11, dtype=dtype)
        outputs = [out for out, _ in driver.step(37)]
        for _ in range(steps):
            outputs += [out for out, _ in driver.step(1)]
        return outputs, seq.stats(), seq.graphs


@pytest.mark.parametrize("mode", ["sparse", "remap", "exact"])
@pytest.mark.parametrize("device_blocks", [64, 9], ids=["kv-fits", "kv-overflows"])
@pytest.mark.parametrize("piece_blocks", [None, 3], ids=["one-piece", "pieces-of-3"])
def test_padded_reads_agree_across_paths_on_the_cpu(tmp_path, monkeypatch, mode: str, device_blocks: int,
                                                    piece_blocks: int | None) -> None:  # fmt: skip
    """The padded read, forced on the CPU (where it is off): the block tables' read and the host
    path's give the same bits, in one piece or several, and both stay within rounding of the
    unpadded read."""
    if piece_blocks is not None:
        monkeypatch.setattr(hkv.attention.sequence, "PIECE_KV_ELEMENTS", piece_blocks * 2 * HKV * 4 * D)
    tables, stats, _ = _outputs(_config(tmp_path / "t", mode, device_blocks), device="cpu", dtype=torch.float32, padded=True)
    host, _, _ = _outputs(_config(tmp_path / "h", mode, device_blocks), device="cpu", dtype=torch.float32, padded=True, tables=False)
    plain, _, _ = _outputs(_config(tmp_path / "p", mode, device_blocks), device="cpu", dtype=torch.float32, padded=False)
    for a, b, c in zip(tables, host, plain, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    if device_blocks == 64:
        assert stats.table_reads == 14 * LAYERS


def test_the_padded_read_is_exact(tmp_path) -> None:
    """Exact mode with the padded read forced (CPU): every step matches full attention, the
    window's unwritten end never seen, at every fill of it (4-token blocks, 1..4 tokens)."""
    config = make_config(tmp_path, mode="exact", device_blocks=64, host_blocks=40)
    with opened_sequence(config) as (manager, seq):
        seq._padded = True
        driver = Driver(seq, manager, seed=2)
        driver.check_exact(driver.step(13))
        for _ in range(9):
            driver.check_exact(driver.step(1))
        assert seq.step_stats().table_reads == LAYERS


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["sparse", "remap", "exact"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_graph_replays_are_bitwise_the_eager_reads(tmp_path, mode: str, dtype: torch.dtype) -> None:
    """fp16 / bf16 on a GPU: with CUDA graphs, without them, and through the host path, the same
    bits at every layer of every step, blocks sealed on the way (a new capture each time);
    remap (whose query rotation moves every step) runs eagerly."""
    graphs_on, stats, graphs = _outputs(_config(tmp_path / "g", mode, 64), device="cuda", dtype=dtype)
    off = Config.load(_config(tmp_path / "e", mode, 64), attention={"cuda_graphs": False}, env={})
    eager, _, no_graphs = _outputs(off, device="cuda", dtype=dtype)
    host, _, _ = _outputs(_config(tmp_path / "h", mode, 64), device="cuda", dtype=dtype, tables=False)
    assert no_graphs is None and graphs.failure is None
    for a, b, c in zip(graphs_on, eager, host, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert stats.table_reads == 14 * LAYERS
    if mode == "remap":
        assert graphs.captures == 0
    else:  # a capture per layer per geometry (a block sealed every 4 steps), a replay per read
        assert 0 < graphs.captures < 14 * LAYERS and graphs.replays == 14 * LAYERS, (graphs.captures, graphs.replays)


@pytest.mark.cuda
def test_graphs_follow_a_block_leaving_the_device(tmp_path) -> None:
    """A KV larger than the device tier (fp16): layers go between the host path and replays as
    blocks come and go, with the bits of a run without graphs."""
    config = _config(tmp_path / "g", "sparse", 9)
    with_graphs, stats, graphs = _outputs(config, device="cuda", dtype=torch.float16, steps=20)
    off = Config.load(_config(tmp_path / "e", "sparse", 9), attention={"cuda_graphs": False}, env={})
    without, _, _ = _outputs(off, device="cuda", dtype=torch.float16, steps=20)
    for a, b in zip(with_graphs, without, strict=True):
        assert torch.equal(a, b)
    assert graphs.failure is None


@pytest.mark.cuda
def test_graph_captures_and_replays_never_synchronise(tmp_path) -> None:
    """``torch.cuda.set_sync_debug_mode("error")`` around every layer's attention of decode steps
    in fp16, captures (at block boundaries) and replays alike; a capture that failed would show
    in ``failure``."""
    config = _config(tmp_path, "sparse", 64)
    with opened_sequence(config, device="cuda", dtype=torch.float16) as (manager, seq):
        driver = Driver(seq, manager, seed=7, dtype=torch.float16)
        driver.step(37)
        driver.step(1)  # the tables are built, the first graphs captured (and checked) at the first decode step
        attend_without_syncs(seq, 9, dtype=torch.float16)
        assert seq.graphs.failure is None and seq.graphs.captures > LAYERS


class _ClosureGraph:
    """A stand-in for a captured CUDA graph on the CPU: replay runs the captured function again
    over the same static inputs and objects, so a value that changes between the steps of one
    key but was taken at capture time (and left out of the key) shows as a wrong result."""

    def __init__(self, build, query, mask, out) -> None:
        self.build, self.query, self.mask, self.out = build, query, mask, out

    def replay(self) -> None:
        self.out.copy_(self.build(self.query, self.mask))


class _ClosureGraphs(hkv.attention.sequence.DecodeGraphs):
    """:class:`DecodeGraphs` with :class:`_ClosureGraph` captures (no CUDA needed)."""

    def __init__(self, num_layers: int) -> None:  # no CUDA pool or stream
        self.device = torch.device("cpu")
        self._reads = [None] * num_layers
        self._warm, self.enabled, self.failure, self.captures, self.replays = False, True, None, 0, 0

    def _capture(self, key, build, query, tail, keys):
        static_query = query.clone()
        static_mask = torch.zeros(1, 1, 1, keys, dtype=tail.dtype)
        static_mask[..., keys - tail.shape[-1] :] = tail
        out = build(static_query, static_mask).clone()
        self.captures += 1
        read = hkv.attention.decode_graphs.CapturedRead(key, None, static_query, static_mask, out)
        read.graph = _ClosureGraph(build, static_query, static_mask, out)
        return read, None


@pytest.mark.parametrize("mode", ["sparse", "exact"])
@pytest.mark.parametrize("device_blocks", [64, 9], ids=["kv-fits", "kv-overflows"])
def test_what_a_capture_holds_is_keyed_on_the_cpu(tmp_path, mode: str, device_blocks: int) -> None:
    """The graphs' bookkeeping on the CPU, with captures that keep the captured function and its
    objects: replays over steps that seal blocks (new geometry, a new capture), steps that do
    not (the window's mask and the query are the only inputs) and, with a small device tier,
    tables rebuilt in place as blocks move, give the eager road's bits."""
    config = _config(tmp_path / "g", mode, device_blocks)
    with opened_sequence(config) as (manager, seq):
        seq._padded, seq._graphs = True, _ClosureGraphs(LAYERS)
        driver = Driver(seq, manager, seed=11)
        replayed = [out for out, _ in driver.step(37)]
        for _ in range(14):
            replayed += [out for out, _ in driver.step(1)]
        graphs = seq.graphs
    eager, stats, _ = _outputs(_config(tmp_path / "e", mode, device_blocks), device="cpu", dtype=torch.float32, padded=True)
    for a, b in zip(replayed, eager, strict=True):
        assert torch.equal(a, b)
    assert graphs.replays == stats.table_reads and 0 < graphs.captures < graphs.replays
