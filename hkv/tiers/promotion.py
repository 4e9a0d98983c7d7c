"""Moving blocks *up* the tiers: on-demand fetches for :meth:`gather` and the prefetcher's
:meth:`promote`.

A move up has three phases. Plan, under the manager's lock: mark the blocks busy and reserve
their destination slots (evicting by policy, see :mod:`hkv.tiers.placement`). Copy, without the
lock: disk reads into a staging buffer (pinned on CUDA) and from there into host slots, then
host -> device copies -- on CUDA queued on the copy stream, which records one event per move.
Commit, under the lock: assign the slots, clear busy, store the event, notify waiters. A busy
block is never evicted, deleted or moved by anyone else, so the copy phase needs no lock; a
gather that needs a busy block waits on the manager's condition, then orders its read after
the block's event with ``wait_event`` (no ``synchronize()``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch

from ..blocks import BlockKey
from .base import TierError
from .placement import Digest, Entry, Placement
from .pool import copy_slots, runs
from .remote_blocks import RemoteBlocks
from .slot_codec import SlotCodec

_SLOT_PROBES = 8  # keys table_rows looks up spread over the layer before the rest


@dataclass(slots=True)
class GatherReport:
    """What one or more :meth:`TierManager.gather` calls found (block counts, seconds).

    Each distinct block of a gather is counted once, in exactly one of ``resident``, ``waited``
    and ``fetched``. ``late_keys``: when a set (``GatherReport(late_keys=set())``), the digests
    of the blocks waited for or fetched are added to it, so that a caller can tell which of its
    blocks were on the device at once (:class:`~hkv.attention.sequence.SequenceKV` classifies
    each block it reads this way)."""

    resident: int = 0  # already on the device
    waited: int = 0  # in flight (being promoted by another thread), waited for
    fetched: int = 0  # not on the device, fetched on demand
    stall_s: float = 0.0  # time spent because blocks were not on the device: waiting for a promotion in flight, or fetching on demand (not lock waits or per-gather bookkeeping)
    late_keys: set[bytes] | None = field(default=None, compare=False)  # digests of the blocks waited for or fetched (when a set)
    copy_s: float = 0.0  # time in gather_into's one read of the device pool (the bytes read), with the lock held


@dataclass(slots=True)
class _Plan:
    """Blocks being moved up: slots reserved under the lock, copied without it."""

    keys: list[Digest]  # the blocks moved (marked busy)
    entries: list[Entry]  # their entries
    disk_keys: list[Digest]  # those read from disk into ``staging``
    host_dst: dict[Digest, int]  # reserved host slot of a disk read
    dev_dst: dict[Digest, int]  # reserved device slot
    staging: torch.Tensor | None = None  # [len(disk_keys), *slot shape] of the host pool, CPU (pinned on CUDA)
    staging_codec: SlotCodec | None = None  # how staging rows hold blocks: the host pool's slot format
    event: object = None  # CUDA event of the host -> device copies
    done: bool = False  # the copies finished; False on failure (reservations are returned)


class Promotion(Placement):
    """The moves up of the tier manager (see the module docstring)."""

    remote_blocks: RemoteBlocks  # made by the manager: blocks still on the remote tier, brought before a read

    # -- moving up ------------------------------------------------------------------------------
    def gather(self, keys: Sequence[BlockKey], *, report: GatherReport | None = None) -> torch.Tensor:
        """The blocks as one new tensor ``[n, 2, kv_heads, block_tokens, head_dim]`` on the device.

        Blocks not on the device are promoted on demand (disk -> host -> device); blocks that a
        concurrent :meth:`promote` (the prefetcher's threads) is moving are waited for, not
        read twice. Raises ValueError if ``n`` exceeds :meth:`gather_capacity` (pinned blocks
        among ``keys`` do not count). If ``report`` is given, its counters are increased.
        """
        keys = [key.digest for key in keys]  # internally blocks are known by their digest
        unique = list(dict.fromkeys(keys))
        with self._cond:
            self._check_open()
            entries = [self._get(key) for key in unique]
            unpinned = sum(not entry.pinned for entry in entries)
            if unpinned > self.device_pool.n_slots - self._pinned_count:
                raise ValueError(
                    f"gather of {unpinned} unpinned blocks exceeds gather_capacity() = {self.device_pool.n_slots - self._pinned_count}"
                )
            for entry in entries:
                entry.holds += 1
        try:
            busy, resident, missing, plan, stalled = self._fetch(unique, entries)
            with self._cond:
                on_device = {key: self.device_pool.slot(key) for key in unique if self.device_pool.contains(key)}
                direct = {key: self.host_pool.slot(key) for key in unique if key not in on_device}
                events = [entry.event for entry in entries]
            out = self._assemble(keys, on_device, direct, plan, events)
        finally:
            self._unhold(entries)
        _count(report, busy, resident, missing, stalled)
        return out

    def gather_into(self, keys: Sequence[Digest], out: torch.Tensor, *, report: GatherReport | None = None) -> None:
        """Write the distinct blocks ``keys`` (digests) into ``out`` ``[2, kv_heads, n, block_tokens,
        head_dim]`` (keys / values first, the attention layout: ``out[0, h]`` reshaped is head
        ``h``'s keys of all ``n`` blocks in order); ``out`` may be a view into a larger buffer.

        The decode step's read. The blocks not on the device are brought there first (waiting
        for promotions in flight, fetching the rest on demand, as :meth:`gather` does); then,
        under the lock, one dict lookup per block and one ``index_select`` from the device pool
        straight into ``out``: no block can be evicted or its slot reused meanwhile (on CUDA the
        read is ordered after the blocks' promotion events and before any later copy into their
        slots, as in :meth:`gather`). When blocks cannot all be on the device at once (more than
        :meth:`gather_capacity`, or evicted again before the read) they go through :meth:`gather`
        in waves. Either way ``out`` ends up with the same bytes, and ``report`` counts each
        block once."""
        n = len(keys)
        if n == 0:
            return
        for attempt in range(2):
            with self._cond:
                self._check_open()
                on_device = self.device_pool.slot_map
                slots = [on_device.get(key) for key in keys]
                if None not in slots:
                    if self.copies.cuda:
                        self.copies.order_after([self._entries[key].event for key in keys])
                    pool = self.device_pool
                    started = time.perf_counter()
                    torch.index_select(pool.data.permute(1, 2, 0, 3, 4), 2, pool.index(slots), out=out)
                    self.copies.mark_use()
                    if report is not None:
                        report.copy_s += time.perf_counter() - started
                        if attempt == 0:
                            report.resident += n
                    return
                capacity = self.device_pool.n_slots - self._pinned_count
                missing = [key for key, slot in zip(keys, slots) if slot is None]
                if not self.copies.cuda and self._read_from_host(keys, slots, missing, out, report if attempt == 0 else None):
                    return
            if attempt == 1 or len(missing) > capacity:
                break
            # counts the missing blocks: waited for or fetched. Pools sharing one tensor: to the
            # host alone (the read takes them there; a device copy would be one more memcpy)
            self._bring(missing, report, to="host" if self.shared_rows is not None else "device")
            if report is not None:
                report.resident += n - len(missing)
        if capacity < 1:
            raise RuntimeError("the device tier has no unpinned room to read blocks into; raise tiers.device")
        counted = attempt == 1  # the first attempt counted every block already
        blocks = [BlockKey(key) for key in keys]
        for w in range(0, n, capacity):
            part = self.gather(blocks[w : w + capacity], report=None if counted else report)  # [m, 2, Hkv, bt, D]
            out[:, :, w : w + part.shape[0]].copy_(part.permute(1, 2, 0, 3, 4))

    def table_rows(self, keys: Sequence[BlockKey], first: int = 0) -> tuple[int, list[int]] | int:
        """``(epoch, rows)``: the rows of ``keys`` in :meth:`table_source` when every one is there
        (on the device; without a GPU, on the device or the host, whose pools are then rows of
        one tensor: a device slot, else the host slot after the device's rows), with the
        :attr:`table_epoch` they hold at and the current stream ordered after their promotions
        (on CUDA); else the index of a key that is not (``keys[first]`` looked up first, a
        caller's hint from a previous miss, so that a block still away costs one lookup, not a
        pass over the layer's keys).

        The rows stay true while :attr:`table_epoch` keeps that value: read them with
        :meth:`read_table_rows`, which checks it under the lock."""
        with self._cond:
            self._check_open()
            on_device = self.device_pool.slot_map
            shared = self.shared_rows
            on_host = self.host_pool.slot_map if shared is not None else {}
            if 0 <= first < len(keys) and keys[first].digest not in on_device and keys[first].digest not in on_host:
                return first
            # A few keys spread over the layer first: one mostly away (a 128K context over a
            # device tier of 1/8 of it) then fails in ~10 lookups, not a pass over 2,048 keys.
            for probe in range(0, len(keys), max(1, len(keys) // _SLOT_PROBES)):
                if keys[probe].digest not in on_device and keys[probe].digest not in on_host:
                    return probe
            digests = [key.digest for key in keys]
            rows = [on_device.get(key) for key in digests]
            if shared is not None and None in rows:
                offset = shared.offset
                rows = [row if row is not None else (None if (slot := on_host.get(key)) is None else offset + slot)
                        for row, key in zip(rows, digests)]  # fmt: skip
            if None in rows:
                return rows.index(None)
            if self.copies.cuda:
                self.copies.order_after([self._entries[key].event for key in digests])
            return self.table_epoch, rows  # type: ignore[return-value]

    def table_source(self) -> torch.Tensor:
        """The tensor :meth:`table_rows` index (lock held): the device pool's, or both pools' shared one."""
        return self.shared_rows.data if self.shared_rows is not None else self.device_pool.data

    def read_table_rows(self, epoch: int, reads: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                        report: GatherReport | None = None) -> bool:  # fmt: skip
        """For each ``(rows, out)`` of ``reads``: ``out`` ``[2, kv_heads, n, block_tokens, head_dim]``
        <- the blocks at ``rows`` (a long tensor ``[n]`` on the device) of :meth:`table_source`,
        as :meth:`gather_into` writes them, when no block has left its row since ``epoch``
        (:meth:`table_rows`); else nothing is read and False is returned. No host list of the
        blocks and no device -> host transfer: the rows may come from a device-side selection.
        On CUDA the reads are queued before any later copy into these slots (as a gather's are).
        Every block read counts as resident: read in place, nothing moved."""

        def read(source: torch.Tensor) -> None:
            for rows, out in reads:
                torch.index_select(source, 2, rows, out=out)

        return self.run_table_read(epoch, read, sum(rows.numel() for rows, _ in reads), report=report)

    def run_table_read(self, epoch: int, read: Callable[[torch.Tensor], object], blocks: int, *,
                       report: GatherReport | None = None) -> bool:  # fmt: skip
        """``read(source)`` under the lock, when no block has left its row since ``epoch``, where
        ``source`` is :meth:`table_source` as ``[2, kv_heads, rows, block_tokens, head_dim]``: the
        queued reads of a block table's rows (:meth:`read_table_rows`, or a CUDA graph's replay,
        :mod:`~hkv.attention.decode_graphs`); False (nothing run) when the epoch moved. ``blocks``:
        the blocks ``read`` reads, counted resident in ``report``."""
        with self._cond:
            self._check_open()
            if epoch != self.table_epoch:
                return False
            started = time.perf_counter()
            read(self.table_source().permute(1, 2, 0, 3, 4))
            self.copies.mark_use()
            if report is not None:
                report.copy_s += time.perf_counter() - started
                report.resident += blocks
        return True

    def _read_from_host(self, keys: Sequence[Digest], slots: list[int | None], missing: list[Digest], out: torch.Tensor,
                        report: GatherReport | None) -> bool:
        """Without a GPU (lock held): when every block of ``keys`` not on the device (``missing``)
        has a host copy, read those from the host pool and the rest from the device pool into
        ``out``, without promoting anything; True when done. The two pools are both RAM there:
        a promotion would copy each block twice more (host -> device slot, device slot -> out)
        and evict another block, where the read needs one copy. The bytes are the same, so the
        attention's result does not change. The blocks read from the host count as fetched (on
        demand, the time of their copies as stall); a disk-only block leaves it to the promotion.
        Where the two pools share one tensor (:class:`~hkv.tiers.pool.SharedRows`) every row is
        read in one ``index_select``, in place, and every block counts as resident, as a block
        table's read does."""
        on_host = self.host_pool.slot_map
        host_slots = [on_host.get(key) for key in missing]
        if None in host_slots:
            return False
        started = time.perf_counter()
        shared = self.shared_rows
        if shared is not None:
            from_host = iter(host_slots)
            rows = [slot if slot is not None else shared.offset + next(from_host) for slot in slots]
            torch.index_select(shared.data.permute(1, 2, 0, 3, 4), 2, torch.tensor(rows, dtype=torch.long), out=out)
            if report is not None:
                report.copy_s += time.perf_counter() - started
                report.resident += len(keys)
            return True
        pool = self.device_pool
        if 2 * len(missing) < len(keys):  # mostly on the device: every row in one pass (a missing one from slot 0, overwritten below)
            torch.index_select(pool.data.permute(1, 2, 0, 3, 4), 2, pool.index([0 if slot is None else slot for slot in slots]), out=out)
        else:  # mostly from the host: the device's rows alone (a pass over every row copied most of them twice)
            for i, slot in enumerate(slots):
                if slot is not None:
                    out[:, :, i].copy_(pool.data[slot])
        copied = time.perf_counter()
        rows = [i for i, slot in enumerate(slots) if slot is None]
        host = self.host_pool
        if host.codec.lossy:  # decoded into a temporary, then one op
            fetched = host.read_slots(host_slots)  # [m, *layout.shape]
            out.index_copy_(2, torch.as_tensor(rows, dtype=torch.long), fetched.permute(1, 2, 0, 3, 4))
        else:  # straight from the slots: one pass over the bytes (a temporary and index_copy_ take two)
            for i, slot in zip(rows, host_slots):
                out[:, :, i].copy_(host.data[slot])
        if report is not None:
            done = time.perf_counter()
            report.copy_s += copied - started
            report.stall_s += done - copied
            report.resident += len(keys) - len(missing)
            report.fetched += len(missing)
            if report.late_keys is not None:
                report.late_keys.update(missing)
        self.moved["host->device"] += self.layout.nbytes * len(missing)
        return True

    def _unhold(self, entries: list[Entry]) -> None:
        """Drop the holds a gather, bring or pin took on ``entries``; wake release/delete, which
        wait for holds to drop."""
        with self._cond:
            for entry in entries:
                entry.holds -= 1
            self._cond.notify_all()

    def _bring(self, keys: list[Digest], report: GatherReport | None, to: str = "device") -> None:
        """Bring the distinct blocks ``keys`` to ``to`` ("device", or "host": RAM, where the pools
        share one tensor) as far as room allows (:meth:`gather` without the read): hold them, wait
        for the busy ones, fetch the rest; count them in ``report`` (waited or fetched; those
        found there meanwhile as resident)."""
        with self._cond:
            self._check_open()
            entries = [self._get(key) for key in keys]
            for entry in entries:
                entry.holds += 1
        try:
            busy, resident, missing, _, stalled = self._fetch(keys, entries, to)
        finally:
            self._unhold(entries)
        _count(report, busy, resident, missing, stalled)

    def _fetch(self, unique: list[Digest], entries: list[Entry], to: str = "device") -> tuple[list[Digest], int, list[Digest], _Plan | None, float]:
        """Bring held blocks to ``to`` (as far as room allows; "host": to RAM, a block on the device
        stays there): wait for the busy ones, fetch the rest. Returns (blocks waited for, how many were resident at once, blocks fetched,
        the fetch plan, seconds stalled).

        Stalled time is only the time spent because data was not on the device: from the moment
        a block is found busy or missing until it is there (waiting for a promotion in flight,
        planning, copying and committing an on-demand fetch). Taking the lock and the
        bookkeeping every gather does (holds, slot lookups, assembling the output) are not
        stalls: they cost the same when every block is resident."""
        if self.remote_blocks:  # a lazily pulled session's blocks: into the local store first
            self.remote_blocks.ensure(unique, strict=True)
        with self._cond:
            self._check_open()
            busy = [key for key, entry in zip(unique, entries) if entry.busy]
            start = time.perf_counter() if busy else None
            if busy:
                self._cond.wait_for(lambda: not any(entry.busy for entry in entries))
            on_device = self.device_pool.slot_map
            missing = [key for key in unique if key not in on_device]
            if to == "host":
                on_host = self.host_pool.slot_map
                missing = [key for key in missing if key not in on_host]
            if missing and start is None:
                start = time.perf_counter()
            plan = self._plan_up(missing, to, must=True, exclude=set(unique)) if missing else None
        if plan is not None:
            try:
                self._run_plan(plan)
            finally:
                with self._cond:
                    self._commit_plan(plan)
            uncached = len(plan.disk_keys) - len(plan.host_dst)
            if uncached:  # no host victim could be dropped: queue disk copies so the next reads can
                self.clean_host(uncached)
        stalled = time.perf_counter() - start if start is not None else 0.0
        waited = set(busy)
        fetched = [key for key in missing if key not in waited]
        return busy, len(unique) - len(busy) - len(fetched), fetched, plan, stalled

    def missing_from_device(self, keys: Sequence[BlockKey]) -> list[BlockKey]:
        """The ``keys`` not on the device now, in order, without taking the lock: a hint for the
        prefetcher (skip resident blocks before queueing work), never for correctness -- the
        answer may be stale by the time it is used, and :meth:`promote` checks again under the
        lock. (One dict lookup per key; the GIL makes each lookup atomic.)"""
        on_device = self.device_pool.slot_map
        return [key for key in keys if key.digest not in on_device]

    def missing_from(self, keys: Sequence[BlockKey], to: str) -> list[BlockKey]:
        """:meth:`missing_from_device` for ``to = "device"``; for ``"host"``, the keys in neither
        pool (a block on the device is above the host already)."""
        if to == "device":
            return self.missing_from_device(keys)
        on_device, on_host = self.device_pool.slot_map, self.host_pool.slot_map
        return [key for key in keys if key.digest not in on_device and key.digest not in on_host]

    @property
    def prefetch_tier(self) -> str:
        """Where prefetches bring blocks: the device; without a GPU, where the two pools are rows
        of one tensor (:class:`~hkv.tiers.pool.SharedRows`), the host, since a step reads RAM in
        place and a copy into a device slot would only cost a memcpy and an eviction."""
        return "host" if self.shared_rows is not None else "device"

    def _assemble(self, keys, on_device, direct, plan, events) -> torch.Tensor:
        """``out[i]`` = block ``keys[i]``: device slots by one ``index_select``, the rest (no device
        room) copied from their staging row or host slot."""
        self.copies.order_after(events)
        pool = self.device_pool
        rows_dev = [i for i, key in enumerate(keys) if key in on_device]
        if len(rows_dev) == len(keys):
            out = pool.data.index_select(0, pool.index([on_device[key] for key in keys]))
        else:
            out = torch.empty((len(keys), *self.layout.shape), dtype=self.layout.dtype, device=self.device)
            if rows_dev:
                picked = pool.data.index_select(0, pool.index([on_device[keys[i]] for i in rows_dev]))
                out.index_copy_(0, torch.as_tensor(rows_dev, dtype=torch.long, device=self.device), picked)
            staged = {key: i for i, key in enumerate(plan.disk_keys)} if plan is not None else {}
            for i, key in enumerate(keys):
                if key in on_device:
                    continue
                if key in staged and plan.staging is None:  # read straight into its host slot (a CPU)
                    out[i].copy_(self.host_pool.data[plan.host_dst[key]])
                elif key in staged:
                    row = plan.staging[staged[key] : staged[key] + 1]
                    if plan.staging_codec is not None and plan.staging_codec.lossy:
                        row = plan.staging_codec.decode(row)
                    out[i].copy_(row[0], non_blocking=True)
                elif direct.get(key) is not None:  # blocking: the host slot may be reused once we return
                    out[i].copy_(self.host_pool.read_slots([direct[key]])[0])
                else:  # held blocks cannot vanish; this would be a bug, so say so loudly
                    raise TierError(f"gather: block {key.hex()} vanished while held")
        self.copies.mark_use()
        return out

    def promote(self, keys: Sequence[BlockKey], to: str = "device") -> None:
        """Bring blocks up to ``to`` ("host" or "device"); blocks already there are skipped.

        Called from the prefetcher's worker threads: the disk read and the copy run without
        holding the manager's lock, blocks being moved are marked in flight so :meth:`gather`
        waits for them. On CUDA the host -> device copy runs on the manager's copy stream and
        :meth:`gather` orders on its event. If the device has no unpinned room the block stops
        at host (prefetch is best effort; never raises for lack of room). Unknown keys are skipped."""
        if to not in ("host", "device"):
            raise ValueError(f"promote: to = {to!r} must be 'host' or 'device'")
        if self.remote_blocks:  # best effort: a block lost on the remote tier is left to the gather, which says so
            kept = set(self.remote_blocks.ensure([key.digest for key in keys], strict=False))
            keys = [key for key in keys if key.digest in kept]
        with self._cond:
            self._check_open()
            get, on_device, on_host = self._entries.get, self.device_pool.slot_map, self.host_pool.slot_map
            todo = []
            for key in dict.fromkeys(key.digest for key in keys):
                entry = get(key)
                if entry is None or entry.busy or key in on_device or (to == "host" and key in on_host):
                    continue  # deleted, moved by someone else, or already there
                todo.append(key)
            plan = self._plan_up(todo, to, must=False, exclude=set(todo)) if todo else None
            if plan is None or not plan.keys:
                return
        try:
            self._run_plan(plan)
        finally:
            with self._cond:
                self._commit_plan(plan)

    def write_back(self, limit: int, *, scan: int | None = None) -> int:
        """Give host copies to up to ``limit`` of the device's least recently used evictable
        blocks that have no copy below (the device copy stays); returns how many.

        Such a block must be *moved* down when it is evicted, a synchronous device -> host copy
        under the lock; when the victim is chosen by a gather's on-demand fetch, that copy lands
        on the decode step's critical path (after a prefill the device is full of such blocks).
        The prefetcher's workers call this off the critical path, so later evictions are plain
        drops. Only the ``scan`` (default ``4 * limit + 64``) next victims in LRU order are
        looked at, so a call is cheap when there is nothing to clean. The blocks are held (not
        busy) while copied: gathers read them meanwhile, nobody evicts or deletes them."""
        if limit < 1:
            return 0
        scan = 4 * limit + 64 if scan is None else scan
        with self._cond:
            self._check_open()
            cleaning, on_host = self._cleaning, self.host_pool.slot_map
            todo = self._next_victims("device", limit, scan, lambda key, entry: not (
                entry.busy or entry.pinned or entry.on_disk or key in on_host or key in cleaning))  # fmt: skip
            if not todo:
                return 0
            # free host slots or drops only: never spill to disk under the lock for a clean-up
            slots = self._make_room("host", len(todo), set(todo), move=False)
            todo = todo[: len(slots)]
            if not todo:
                return 0
            held = [self._entries[key] for key in todo]
            for entry in held:
                entry.holds += 1
            cleaning.update(todo)
            src = self.device_pool.slots(todo)
            events = [entry.event for entry in held] if self.copies.cuda else ()
        done = False
        try:
            self.copies.to_host(self.host_pool, slots, self.device_pool.data, src, events)
            done = True
        finally:
            with self._cond:
                for entry in held:
                    entry.holds -= 1
                cleaning.difference_update(todo)
                if done:
                    self.host_pool.assign_many(todo, slots)
                    self._recent["host"].update(dict.fromkeys(todo))
                    self.moved["device->host"] += self.layout.nbytes * len(todo)
                else:
                    for slot in slots:
                        self.host_pool.unreserve(slot)
                self._cond.notify_all()
        return len(todo)

    def _next_victims(self, tier: str, count: int, scan: int, wanted: Callable[[Digest, Entry], bool]) -> list[Digest]:
        """Up to ``count`` of ``tier``'s next eviction victims (least recently used first, among
        the first ``scan``) for which ``wanted(key, entry)`` holds (lock held)."""
        found: list[Digest] = []
        if count < 1:
            return found
        entries = self._entries
        # a prefetch worker runs this with the GIL held, mostly over clean victims: keep the loop bare
        for key in islice(self._recent[tier], scan):
            if wanted(key, entries[key]):
                found.append(key)
                if len(found) >= count:
                    break
        return found

    def clean_host(self, limit: int, *, scan: int | None = None) -> int:
        """Give disk copies to up to ``limit`` of the host's least recently used blocks that have
        no copy on the device or the disk; returns how many were queued.

        The host's counterpart of :meth:`write_back`. A gather reads disk blocks into host slots
        only by evicting blocks that have a copy elsewhere; after a long prefill the host is full
        of blocks that have none (the newest ones, never spilled), so every on-demand disk read
        scanned the whole host tier for a victim and then read into a staging row instead,
        caching nothing. The prefetcher's workers call this off the critical path. The write is
        the store writer's (asynchronous: the block counts as on disk at once, and an eviction
        that needs the copy waits for it); only disk records beyond those every block of the host
        and device tiers could still spill into are used (never an eviction, never a record a later
        spill needs), and only the ``scan`` (default ``4 * limit + 64``) next victims in LRU order
        are looked at; a disk tier not yet opened is left alone. Gathers call it too when a disk
        read found no host slot to keep."""
        if limit < 1 or self._disk is None:
            return 0
        scan = 4 * limit + 64 if scan is None else scan
        with self._cond:
            self._check_open()
            # leave the records every block above could spill into: a copy made early never takes a later spill's room
            spare = self.disk_capacity_blocks - self._disk_count - self.host_pool.n_slots - self.device_pool.n_slots
            room = min(limit, spare)
            if room < 1:
                return 0
            on_device = self.device_pool.slot_map
            todo = self._next_victims("host", room, scan, lambda key, entry: not (entry.on_disk or entry.busy or key in on_device))
            return self._copy_to_disk_later(todo)

    def _plan_up(self, keys: list[Digest], to: str, *, must: bool, exclude: set[Digest]) -> _Plan:
        """Reserve slots and mark the moved blocks busy (lock held). Device slots are best effort;
        a disk-only block gets a host slot when there is room, else (``must``) a staging row."""
        dev = self._make_room("device", len(keys), exclude) if to == "device" else []
        dev_dst = dict(zip(keys, dev))
        on_host = self.host_pool.slot_map
        on_disk_only = [key for key in keys if key not in on_host]
        # A disk read also fills a host slot. A gather takes one only when it is free or freed by
        # a drop, not by a spill; a promotion may spill. A gather can still write to disk: making
        # device room above moves a device-only victim to the host, which may spill a host-only
        # block to disk (a synchronous write on the gather's path).
        host = self._make_room("host", len(on_disk_only), exclude, move=not must) if on_disk_only else []
        host_dst = dict(zip(on_disk_only, host))
        if not must:  # nothing to do for blocks that got no slot at all
            keys = [key for key in keys if key in dev_dst or key in host_dst]
            on_disk_only = [key for key in on_disk_only if key in dev_dst or key in host_dst]
        entries = [self._entries[key] for key in keys]
        for entry in entries:
            entry.busy = True
        return _Plan(keys, entries, on_disk_only, host_dst, dev_dst)

    def _run_plan(self, plan: _Plan) -> None:
        """The copies of a plan, without the lock: disk -> staging -> host slots, then -> device.
        Without a GPU, when every block read from disk has a host slot and the host holds raw
        blocks, the records are read straight into those slots (no staging buffer, no copy)."""
        into_host = False
        if plan.disk_keys:
            for key in plan.disk_keys:
                self._wait_disk_write(self._entries[key])
            # Staging rows in the host pool's slot format: an encoded host takes records already in
            # its encoding as they are (no second rounding), and its slots are filled by a plain copy.
            codec = plan.staging_codec = self.host_pool.codec
            records = self.remote_blocks.records(plan.disk_keys) if self.remote_blocks else None  # a lazy pull's, not yet written
            keys = [BlockKey(key) for key in plan.disk_keys]
            into_host = not self.copies.cuda and not codec.lossy and all(key in plan.host_dst for key in plan.disk_keys)
            if into_host:  # both pools are RAM: the reserved host slots are the read's destination
                self._disk.get_many_into(keys, self.host_pool.data, rows=[plan.host_dst[key] for key in plan.disk_keys],  # type: ignore[union-attr]
                                         records=records)  # fmt: skip
            else:
                plan.staging = self.copies.staging(len(plan.disk_keys), codec)
                self._disk.get_many_into(keys, plan.staging, encoding=codec.encoding, records=records)  # type: ignore[union-attr]
                rows = [i for i, key in enumerate(plan.disk_keys) if key in plan.host_dst]
                copy_slots(self.host_pool.data, [plan.host_dst[plan.disk_keys[i]] for i in rows], plan.staging, rows)
        from_disk = set() if into_host else set(plan.disk_keys)
        from_host = [key for key in plan.dev_dst if key not in from_disk] if from_disk else list(plan.dev_dst)
        host_slot = self.host_pool.slot_map
        # busy: these slots cannot change (a block read into its reserved slot is not in the map yet)
        slots = [plan.host_dst[key] if key in plan.host_dst else host_slot[key] for key in from_host]
        event = self._to_device([plan.dev_dst[key] for key in from_host], self.host_pool.data, slots, self.host_pool.codec)
        staged = [] if into_host else [i for i, key in enumerate(plan.disk_keys) if key in plan.dev_dst]
        if staged:
            dst = [plan.dev_dst[plan.disk_keys[i]] for i in staged]
            event = self._to_device(dst, plan.staging, staged, plan.staging_codec) or event  # in order on the stream
        plan.event, plan.done = event, True

    def _to_device(self, dst_slots: list[int], src: torch.Tensor, src_slots: list[int], codec: SlotCodec | None = None):
        """Copy ``src[src_slots]`` into the device slots ``dst_slots``; the CUDA event or None.
        ``codec``: how ``src``'s slots hold blocks (the host pool's and the staging rows' format;
        None: raw): encoded slots are decoded here, on the copy stream on CUDA.

        Without a GPU both pools are RAM and the copy is a memcpy whose cost is memory traffic:
        copy each run of consecutive slots straight across (one pass over the bytes) instead of
        the batched gather + scatter of :func:`copy_slots` for scattered slots (two passes and a
        temporary), which pays off for DMA but doubles an on-demand fetch's traffic on a CPU."""
        if self.copies.cuda or not dst_slots or (codec is not None and codec.lossy):
            return self.copies.to_device(self.device_pool.data, dst_slots, src, src_slots, codec)
        dst = self.device_pool.data
        for d, s, n in runs(dst_slots, src_slots):
            dst[d : d + n].copy_(src[s : s + n])
        return None

    def _commit_plan(self, plan: _Plan) -> None:
        """Assign the reserved slots of a finished plan, or return them if it failed (lock held)."""
        for entry in plan.entries:
            entry.busy = False
        host_keys, dev_keys = list(plan.host_dst), list(plan.dev_dst)
        if not plan.done:
            for slot in plan.host_dst.values():
                self.host_pool.unreserve(slot)
            for slot in plan.dev_dst.values():
                self.device_pool.unreserve(slot)
            self._cond.notify_all()
            return
        nbytes = self.layout.nbytes
        self.host_pool.assign_many(host_keys, list(plan.host_dst.values()))
        self._recent["host"].update(dict.fromkeys(host_keys))
        self.device_pool.assign_many(dev_keys, list(plan.dev_dst.values()))
        self._recent["device"].update(dict.fromkeys(dev_keys))
        host_recent, on_host, dev_dst = self._recent["host"], self.host_pool.slot_map, plan.dev_dst
        for key, entry in zip(plan.keys, plan.entries):
            if key in dev_dst:
                entry.event = plan.event
                if key in on_host:
                    if plan.event is not None:
                        entry.host_guard = plan.event  # the copy reads the host slot until then
                    del host_recent[key]
                    host_recent[key] = None
        if self._recent["disk"]:
            disk_recent = self._recent["disk"]
            for key in plan.keys:
                if key in disk_recent:
                    del disk_recent[key]
                    disk_recent[key] = None
        self.moved["host->device"] += nbytes * len(dev_keys)
        self.moved["disk->host"] += nbytes * len(plan.disk_keys)
        self._cond.notify_all()


def _count(report: GatherReport | None, busy: list[Digest], resident: int, missing: list[Digest], stalled: float) -> None:
    """Add one fetch's outcome (:meth:`Promotion._fetch`) to ``report``, if any."""
    if report is None:
        return
    report.resident += resident
    report.waited += len(busy)
    report.fetched += len(missing)
    report.stall_s += stalled
    if report.late_keys is not None:
        report.late_keys.update(busy)
        report.late_keys.update(missing)
