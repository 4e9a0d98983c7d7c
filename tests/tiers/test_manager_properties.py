"""Property tests of the tier manager: random interleavings of every operation on tiny budgets.

After every step: no tier is over its budget (from ``stats()``), every block that was put and
not deleted is in at least one tier and reads back bitwise (a block may only disappear if no
sequence references it: the disk budget's eviction, or ``release`` without persistence), pinned
blocks are on the device, and ``gather`` returns exactly the blocks asked for.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hkv.blocks import BlockKey, BlockLayout
from hkv.config import Config
from hkv.errors import TierFullError
from hkv.tiers.manager import GatherReport, TierManager
from hkv.tiers.slot_codec import SlotCodec

LAYOUT = BlockLayout(kv_heads=2, block_tokens=4, head_dim=8, dtype=torch.float16)
NB, REC = LAYOUT.nbytes, LAYOUT.record_nbytes
N_KEYS = 24


def key_of(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "little"))


def block_of(i: int) -> torch.Tensor:
    return torch.randn(LAYOUT.shape, generator=torch.Generator().manual_seed(1000 + i)).to(LAYOUT.dtype)


BLOCKS = {i: block_of(i) for i in range(N_KEYS)}
indices = st.lists(st.integers(0, N_KEYS - 1), min_size=1, max_size=5)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="hkv-prop-"))
        self.manager: TierManager | None = None
        self.stored: set[int] = set()  # put and not deleted (nor legitimately evicted)
        self.pinned: set[int] = set()
        self.refs: dict[int, int] = {}

    @initialize(
        device=st.integers(2, 4), host=st.integers(1, 4), disk=st.integers(4, 10),
        policy=st.sampled_from(["lru", "score"]), persist=st.booleans(), disk_full=st.sampled_from(["evict", "refuse"]),
    )  # fmt: skip
    def start(self, device: int, host: int, disk: int, policy: str, persist: bool, disk_full: str) -> None:
        config = Config(
            tiers={"device": device * NB, "host": host * NB, "disk": disk * REC, "path": str(self.folder / "store"),
                   "policy": policy, "disk_full": disk_full},
            store={"persist": persist},
        )  # fmt: skip
        self.manager = TierManager(config, LAYOUT, device="cpu")

    def teardown(self) -> None:
        if self.manager is not None:
            self.manager.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def same(self, got: torch.Tensor, picks: list[int]) -> bool:
        """Whether ``got`` ``[n, *shape]`` holds the blocks ``picks``: bitwise, every tier here being lossless."""
        return torch.equal(got, torch.stack([BLOCKS[i] for i in picks]))

    # -- operations ---------------------------------------------------------------------------------
    @rule(picks=indices, pin=st.booleans(), retain=st.booleans())
    def insert(self, picks: list[int], pin: bool, retain: bool) -> None:
        keys = [key_of(i) for i in picks]
        new = {i for i in picks if i not in self.stored}
        try:
            self.manager.put_many(keys, torch.stack([BLOCKS[i] for i in picks]), pin=pin)
        except TierFullError:
            for i in new:
                assert not self.manager.contains(key_of(i)), "a refused put stored a block"
            return
        self.stored |= new
        if pin:
            self.pinned |= set(picks)
        if retain:
            self.manager.retain([key_of(i) for i in new])
            for i in new:
                self.refs[i] = self.refs.get(i, 0) + 1

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def read(self, data) -> None:
        i = data.draw(st.sampled_from(sorted(self.stored)))
        assert self.same(self.manager.read(key_of(i)).unsqueeze(0), [i])

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def gather(self, data) -> None:
        capacity = self.manager.gather_capacity()
        picks = data.draw(st.lists(st.sampled_from(sorted(self.stored)), min_size=1, max_size=6))
        if len({i for i in picks if i not in self.pinned}) > capacity:
            return
        report = GatherReport()
        out = self.manager.gather([key_of(i) for i in picks], report=report)
        assert self.same(out, picks)
        assert report.resident + report.waited + report.fetched == len(set(picks))

    @rule(picks=indices, to=st.sampled_from(["host", "device"]))
    def promote(self, picks: list[int], to: str) -> None:
        self.manager.promote([key_of(i) for i in picks], to=to)  # best effort, never raises for room

    @precondition(lambda self: self.stored)
    @rule(data=st.data(), to=st.sampled_from(["host", "disk"]))
    def demote(self, data, to: str) -> None:
        picks = data.draw(st.lists(st.sampled_from(sorted(self.stored)), min_size=1, max_size=4))
        try:
            self.manager.demote([key_of(i) for i in picks], to=to)
        except TierFullError:
            pass  # no room below: nothing may be lost (the invariants check it)

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def pin(self, data) -> None:
        picks = data.draw(st.lists(st.sampled_from(sorted(self.stored)), min_size=1, max_size=3))
        try:
            self.manager.pin([key_of(i) for i in picks])
        except TierFullError:
            return
        self.pinned |= set(picks)

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data) -> None:
        picks = data.draw(st.lists(st.sampled_from(sorted(self.pinned)), min_size=1, max_size=3))
        self.manager.unpin([key_of(i) for i in picks])
        self.pinned -= set(picks)

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def delete(self, data) -> None:
        picks = data.draw(st.lists(st.sampled_from(sorted(self.stored)), min_size=1, max_size=3))
        self.manager.delete([key_of(i) for i in picks])
        for i in picks:
            self.stored.discard(i)
            self.pinned.discard(i)
            self.refs.pop(i, None)

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data())
    def release(self, data) -> None:
        i = data.draw(st.sampled_from(sorted(i for i, n in self.refs.items() if n)))
        self.manager.release([key_of(i)])
        self.refs[i] -= 1

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def note_scores(self, data) -> None:
        picks = data.draw(st.lists(st.sampled_from(sorted(self.stored)), min_size=1, max_size=4))
        scores = data.draw(st.lists(st.floats(0, 10), min_size=len(picks), max_size=len(picks)))
        self.manager.note_scores([key_of(i) for i in picks], torch.tensor(scores))

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def budgets_hold(self) -> None:
        if self.manager is None:
            return
        for name, usage in self.manager.stats().tiers.items():
            assert usage.used_bytes <= usage.capacity_bytes, f"{name} over budget: {usage}"

    @invariant()
    def no_block_lost(self) -> None:
        if self.manager is None:
            return
        for i in sorted(self.stored):
            key = key_of(i)
            if not self.manager.contains(key):
                assert not self.refs.get(i) and i not in self.pinned, f"referenced block {i} lost"
                self.stored.discard(i)  # evicted from disk while unreferenced: allowed
                continue
            assert self.manager.where(key), f"block {i} known but in no tier"
            assert self.same(self.manager.read(key).unsqueeze(0), [i]), f"block {i} corrupted"
        for i in self.pinned:
            assert "device" in self.manager.where(key_of(i)), f"pinned block {i} left the device"
        assert self.manager.stats().blocks == len(self.stored)


ManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestManagerProperties = ManagerMachine.TestCase


class EncodedTiersMachine(ManagerMachine):
    """The same interleavings with a lossy host and a raw or lossy disk (``tiers.host_encoding``,
    ``tiers.disk_encoding``): budgets hold, no block is lost, and every read is within the
    rounding of the encodings a block can have passed through (at most three int4 roundings)."""

    @initialize(
        device=st.integers(2, 4), host=st.integers(1, 6), disk=st.integers(4, 10), persist=st.booleans(),
        host_encoding=st.sampled_from(["int8", "int4"]), disk_encoding=st.sampled_from(["none", "int8", "int4"]),
    )  # fmt: skip
    def start(self, device: int, host: int, disk: int, persist: bool, host_encoding: str, disk_encoding: str) -> None:
        slot = SlotCodec(LAYOUT, host_encoding).slot_nbytes
        config = Config(
            tiers={"device": device * NB, "host": host * slot, "disk": disk * LAYOUT.encoded_record_nbytes(disk_encoding),
                   "path": str(self.folder / "store"), "host_encoding": host_encoding, "disk_encoding": disk_encoding},
            store={"persist": persist},
        )  # fmt: skip
        self.manager = TierManager(config, LAYOUT, device="cpu")

    def same(self, got: torch.Tensor, picks: list[int]) -> bool:
        want = torch.stack([BLOCKS[i] for i in picks]).float()
        spread = (want.flatten(1).amax(1) - want.flatten(1).amin(1)).view(-1, 1, 1, 1, 1)
        return bool(((got.float() - want).abs() <= 3 * 0.5 * spread / 15 + 1e-2).all())


EncodedTiersMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=30, deadline=None)
TestEncodedTiersProperties = EncodedTiersMachine.TestCase
