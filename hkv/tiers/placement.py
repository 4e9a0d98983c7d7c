"""Residency bookkeeping and the moves *down* the tiers: eviction, demotion, spills, disk budget.

:class:`Placement` is the half of the tier manager that decides where a block may live and
makes room: it keeps one :class:`Entry` per block, each tier's blocks in recency order, the
disk tier's block count against its budget, and it frees slots by dropping copies that exist
elsewhere or moving the last copy one tier down. Every method here runs with ``_cond`` (the
manager's lock) held. :mod:`hkv.tiers.manager` adds the public API and the moves up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from ..blocks import BlockKey, BlockLayout
from ..store.txn import CommitResult
from .base import BlockNotFoundError, TierError, TierFullError
from .copies import CopyEngine
from .disk import DiskTier
from .policy import EvictionPolicy, LRUPolicy
from .pool import SharedRows, SlotPool

Digest = bytes  # a block's 16-byte key digest: how the manager knows blocks internally (cached hash)
DIRECTIONS = ("host->device", "device->host", "disk->host", "host->disk")


class Entry:
    """What the manager knows of one block besides the pools' slot maps."""

    __slots__ = ("on_disk", "disk_pending", "stored", "pinned", "refs", "busy", "holds", "event", "host_guard")

    def __init__(self) -> None:
        self.on_disk = False  # a disk record exists or is being written (``disk_pending``)
        self.stored = False  # a committed session references it: its disk copy is never evicted or dropped
        self.disk_pending: Future | None = None  # the write-through not yet known durable
        self.pinned = False  # never evicted from the device
        self.refs = 0  # live sequences that reference it (retain / release)
        self.busy = False  # being moved up or read from disk without the lock: nobody else touches it
        self.holds = 0  # gathers / pins reading it: not evicted meanwhile
        self.event = None  # CUDA event of the copy that filled its device slot
        self.host_guard = None  # CUDA event of a copy still reading its host slot


class Placement:
    """Blocks' residency across the pools and the disk tier, and making room (lock held)."""

    def __init__(
        self, device_pool: SlotPool, host_pool: SlotPool, copies: CopyEngine, policy: EvictionPolicy, *,
        layout: BlockLayout, disk_capacity: int, disk_full: str, evict_sessions: bool = False,
        disk_record_nbytes: int | None = None,
    ) -> None:  # fmt: skip
        self.device_pool, self.host_pool, self.copies, self.policy = device_pool, host_pool, copies, policy
        self.layout, self.disk_capacity, self.disk_full = layout, disk_capacity, disk_full
        self.disk_record_nbytes = disk_record_nbytes or layout.record_nbytes  # one disk record (encoded, if so)
        self.evict_sessions = evict_sessions
        # reclaimer(need_bytes) -> CommitResult: drops sessions' KV when unreferenced blocks are not
        # enough (SessionStore.reclaim, bound by the session layer); runs with the lock held.
        self._reclaimer: Callable[[int], object] | None = None
        self._disk: DiskTier | None = None
        self._entries: dict[Digest, Entry] = {}
        # Each tier's blocks, least recently used first (a plain dict keeps insertion order and
        # its bulk update runs in C; "move to end" is pop + insert).
        self._recent: dict[str, dict[Digest, None]] = {name: {} for name in ("device", "host", "disk")}
        self._cond = threading.Condition(threading.RLock())
        self._disk_count = 0  # records stored, being written, or reserved
        self._pinned_count = 0
        # Grows whenever a block leaves a slot that block tables read (SequenceKV's device-side
        # tables: a device slot; without a GPU a host slot too, the pools sharing one tensor):
        # rows looked up at one value stay true while it holds
        self.table_epoch = 0
        self.shared_rows: SharedRows | None = None  # set where the two pools are rows of one tensor
        self._pending: list[tuple[list[Digest], Future]] = []  # write-through futures
        self._cleaning: set[Digest] = set()  # device blocks a clean-up is copying to the host
        # The KV has outgrown the host (a host block was spilled or a new one went straight to
        # disk): blocks entering the host from then on get a disk copy at once (asynchronous).
        self._host_overflowed = False
        self.moved = dict.fromkeys(DIRECTIONS, 0)
        self.evictions = {"device": 0, "host": 0, "disk": 0}

    # -- to be provided by the manager ------------------------------------------------------------
    def _open_disk(self) -> DiskTier:
        raise NotImplementedError

    # -- lookups ----------------------------------------------------------------------------------
    def _get(self, key: Digest) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise BlockNotFoundError(f"block {key.hex()} is not in the tier manager")
        return entry

    def _entry_for(self, key: Digest) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = Entry()
        return entry

    def _where(self, key: Digest) -> frozenset[str]:
        entry = self._entries.get(key)
        if entry is None:
            return frozenset()
        tiers = [name for name, pool in (("device", self.device_pool), ("host", self.host_pool)) if pool.contains(key)]
        return frozenset(tiers + (["disk"] if entry.on_disk else []))

    def _entries_of(self, keys: Sequence[Digest]) -> dict[Digest, Entry]:
        """The entries of the distinct ``keys`` (lock held); BlockNotFoundError for an unknown one."""
        get = self._entries.get
        entries = {key: get(key) for key in keys}
        if None in entries.values():
            self._get(next(key for key, entry in entries.items() if entry is None))
        return entries  # type: ignore[return-value]

    def _cpu_copy(self, key: Digest) -> torch.Tensor:
        """A CPU copy from the device or host pool (lock held)."""
        if self.device_pool.contains(key):
            self.copies.order_after([self._entries[key].event])
            return self.device_pool.view(key).to("cpu", copy=True)
        return self.host_pool.block(key)

    def _pool(self, tier: str) -> SlotPool:
        return self.device_pool if tier == "device" else self.host_pool

    def _touch(self, key: Digest) -> None:
        for recent in self._recent.values():
            if key in recent:
                del recent[key]
                recent[key] = None

    # -- writing pools --------------------------------------------------------------------------
    def _pool_write(self, tier: str, keys: Sequence[Digest], slots: list[int], blocks: torch.Tensor, rows: list[int]) -> None:
        """Assign reserved ``slots`` to ``keys`` and copy ``blocks[rows]`` into them."""
        pool = self._pool(tier)
        pool.assign_many(keys, slots)
        self._recent[tier].update(dict.fromkeys(keys))
        pool.write_slots(slots, blocks, rows)

    # -- dropping copies ------------------------------------------------------------------------
    def _drop(self, tier: str, key: Digest) -> None:
        """Remove ``key``'s copy from a pool (the caller made sure another copy exists)."""
        self._drop_many(tier, [key])

    def _drop_many(self, tier: str, keys: Sequence[Digest]) -> None:
        if not keys:
            return
        if tier == "device":
            entries = [self._entries[key] for key in keys]
            if self.copies.cuda:  # the slots' next writers must run after their fills
                self.copies.order_after([entry.event for entry in entries])
            self.table_epoch += 1
            for entry in entries:
                entry.event = None
                if entry.pinned:
                    entry.pinned = False
                    self._pinned_count -= 1
        elif self.shared_rows is not None:
            self.table_epoch += 1
        elif self.copies.cuda:
            for key in keys:
                entry = self._entries[key]
                if entry.host_guard is not None:
                    CopyEngine.wait_host(entry.host_guard)  # a DMA may still read the slot
                    entry.host_guard = None
        self._pool(tier).remove_many(keys)
        recent = self._recent[tier]
        for key in keys:
            del recent[key]

    def _forget(self, key: Digest) -> None:
        """The block has no copy left (deleted or evicted from disk): drop its entry."""
        self._entries.pop(key, None)
        for recent in self._recent.values():
            recent.pop(key, None)
        self.policy.forget(key)

    def _safe_on_disk(self, entry: Entry, key: Digest) -> bool:
        """Whether a durable disk copy exists (waits for a pending write-through of it)."""
        if not entry.on_disk:
            return False
        if entry.disk_pending is not None:
            try:
                entry.disk_pending.result()  # the writer thread never takes our lock
            except TierError:
                entry.on_disk = False
                self._disk_count -= 1
                self._recent["disk"].pop(key, None)
                return False
            finally:
                entry.disk_pending = None
        return True

    def _copy_elsewhere(self, tier: str, key: Digest) -> bool:
        other = self.host_pool if tier == "device" else self.device_pool
        return other.contains(key) or self._safe_on_disk(self._entries[key], key)

    # -- making room ----------------------------------------------------------------------------
    def _candidates(self, tier: str, exclude: set[Digest], limit: int | None) -> tuple[list[Digest], bool]:
        """Eligible victims of ``tier``, least recently used first; and whether the list is complete."""
        found: list[Digest] = []
        for key in self._recent[tier]:
            entry = self._entries[key]
            if entry.busy or entry.holds or entry.pinned or key in exclude:
                continue
            found.append(key)
            if limit is not None and len(found) >= limit:
                return found, False
        return found, True

    def _make_room(
        self, tier: str, n: int, exclude: set[Digest], *, count: bool = True, move: bool = True, full: bool = False
    ) -> list[int]:
        """Reserve up to ``n`` slots of ``tier`` (free ones first, then by evicting victims by
        policy). Victims with a copy elsewhere are dropped; the others move one tier down
        (unless not ``move``: then only drops). Returns the reserved slots (fewer than ``n``
        when nothing more can be freed)."""
        pool = self._pool(tier)
        got = pool.alloc_many(n)
        if len(got) == n:
            return got
        try:
            limit = None if full or not isinstance(self.policy, LRUPolicy) else 2 * (n - len(got)) + 16
            candidates, complete = self._candidates(tier, exclude, limit)
            ranked = list(self.policy.rank(candidates))
            movers: list[Digest] = []
            i = 0
            while i < len(ranked) and len(got) + len(movers) < n:
                key, i = ranked[i], i + 1
                if self._copy_elsewhere(tier, key):
                    self._drop(tier, key)
                    self.evictions[tier] += count
                    got.append(pool.alloc())  # type: ignore[arg-type]
                elif move:
                    movers.append(key)
            moved = self._move_down(tier, movers, exclude | set(movers), count=count) if movers else []
            got.extend(pool.alloc() for _ in moved)  # type: ignore[misc]
            while len(got) < n and i < len(ranked):  # the move down fell short: drops only
                key, i = ranked[i], i + 1
                if key not in moved and self._copy_elsewhere(tier, key):
                    self._drop(tier, key)
                    self.evictions[tier] += count
                    got.append(pool.alloc())  # type: ignore[arg-type]
            if len(got) < n and not complete:
                got.extend(self._make_room(tier, n - len(got), exclude | set(movers), count=count, move=move, full=True))
        except BaseException:  # e.g. a disk write failing in the move down: give the slots back
            for slot in got:
                pool.unreserve(slot)
            raise
        return got

    def _move_down(self, tier: str, keys: list[Digest], exclude: set[Digest], *, count: bool = True) -> list[Digest]:
        """Move the only copies of ``keys`` from ``tier`` one tier down, as many as fit; the moved keys."""
        nbytes = self.layout.nbytes
        if tier == "device":
            slots = self._make_room("host", len(keys), exclude)  # pressure on the host counts as evictions
            moved = keys[: len(slots)]
            events = [self._entries[key].event for key in moved] if self.copies.cuda else ()
            try:
                self.copies.to_host(self.host_pool, slots, self.device_pool.data, self.device_pool.slots(moved), events)
            except BaseException:  # the reserved host slots would leak: the host tier would fill with nothing
                for slot in slots:
                    self.host_pool.unreserve(slot)
                raise
            self.host_pool.assign_many(moved, slots)
            self._recent["host"].update(dict.fromkeys(moved))
            self._drop_many("device", moved)
            self.moved["device->host"] += nbytes * len(moved)
            if self._host_overflowed:
                self._copy_to_disk_later(moved)
        else:
            moved = keys[: self._disk_reserve(len(keys), exclude, partial=True)]
            if moved:
                self._spill(moved)
                self._drop_many("host", moved)
        self.evictions[tier] += count * len(moved)
        return moved

    def _spill(self, keys: list[Digest]) -> None:
        """Write the host copies of ``keys`` to their reserved disk records, durably."""
        self._host_overflowed = True
        blocks, encoded = self._host_copies(keys)
        self._write_disk(keys, blocks, sync=True, encoded=encoded)

    def _copy_to_disk_later(self, keys: list[Digest]) -> int:
        """Queue asynchronous disk copies of the host blocks ``keys`` that have none, so that
        evicting them later is a drop, not a synchronous spill on some gather's path; how many
        were queued (lock held). Once the KV has outgrown the host, every block that enters it
        without a copy gets one this way (:attr:`_host_overflowed`): the blocks that would be
        spilled later are written once, as before, only sooner, and the host's last ones are
        written too, so that right after a long prefill the host is clean (on a 128K-token
        disk-bound decode the first steps spilled the host's blocks, encoding them under the
        lock, one layer at a time). Blocks on the device keep no disk copy: a device victim
        with one would be dropped instead of moving to the host, which would then cache
        nothing. Only disk records beyond those every block of the host and device tiers could
        still spill into are used (never an eviction, never a record a later spill needs)."""
        if self._disk is None:
            return 0
        spare = self.disk_capacity_blocks - self._disk_count - self.host_pool.n_slots - self.device_pool.n_slots
        entries = self._entries
        todo = [key for key in keys if not entries[key].on_disk][: max(0, spare)]
        if not todo:
            return 0
        self._disk_reserve(len(todo), set(todo), partial=True)  # free records only: no evictions
        blocks, encoded = self._host_copies(todo)  # a copy: encoded later, off our lock
        self._write_disk(todo, blocks, sync=False, encoded=encoded, later=True)
        return len(todo)

    def _host_copies(self, keys: list[Digest]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What a disk write of host blocks ``keys`` takes: ``(raw blocks, None)``, or ``(None,
        payloads)`` when the host slots are already in the disk's encoding (written as they are:
        no decode and re-encode, which would round twice)."""
        host = self.host_pool
        slots = host.slots(keys)
        if host.codec.lossy and host.encoding == self._open_disk().encoding:
            return None, host.data.index_select(0, host.index(slots))
        return host.read_slots(slots), None

    # -- the disk tier --------------------------------------------------------------------------
    @property
    def disk_capacity_blocks(self) -> int:
        return self.disk_capacity // self.disk_record_nbytes

    def _disk_reserve(self, n: int, exclude: set[Digest], *, partial: bool = False) -> int:
        """Reserve room for ``n`` disk records, evicting blocks that no live sequence and no
        committed session references (LRU) if the policy allows, then, if that is not enough,
        sessions' KV through the reclaimer (``store.evict_sessions``). All or TierFullError
        (nothing evicted); with ``partial``, as many as possible."""
        self._open_disk()
        reclaimed = False
        while True:
            free = self.disk_capacity_blocks - self._disk_count
            victims = self._disk_victims(n - free, exclude) if free < n and self.disk_full == "evict" else []
            short = n - free - len(victims)
            if short > 0 and not reclaimed and self._reclaimer is not None and self.disk_full == "evict" and self.evict_sessions:
                reclaimed = True
                self._apply_store_changes(self._reclaimer(short * self.disk_record_nbytes))
                continue  # the freed blocks are no longer counted; unreferenced ones may be victims now
            if short > 0 and not partial:
                how = "no unreferenced block to evict" if self.disk_full == "evict" else 'tiers.disk_full = "refuse"'
                raise TierFullError(
                    f"disk tier full: {n} blocks do not fit in tiers.disk = {self.disk_capacity} bytes "
                    f"({self._disk_count} of {self.disk_capacity_blocks} records used, {len(victims)} evictable; {how})"
                )
            if not victims or not self._delete_disk_copies(victims, evicting=True):
                break  # else some victims turned out to be referenced by a session: choose again
        take = max(0, min(n, self.disk_capacity_blocks - self._disk_count))
        self._disk_count += take
        return take

    def _disk_victims(self, count: int, exclude: set[Digest]) -> list[Digest]:
        """Up to ``count`` evictable disk blocks, least recently used first: no live reference, no
        session reference, not busy or held, not in ``exclude``."""
        victims: list[Digest] = []
        for key in self._recent["disk"]:
            entry = self._entries[key]
            if entry.refs == 0 and not entry.stored and not entry.busy and not entry.holds and key not in exclude:
                victims.append(key)
                if len(victims) >= count:
                    break
        return victims

    def _delete_disk_copies(self, keys: list[Digest], *, evicting: bool = False) -> set[Digest]:
        """Delete the disk copies of ``keys``; returns those the store kept because a committed
        session references them (maybe committed by another process): they stay on disk, marked
        ``stored``."""
        keys = [key for key in keys if self._entries[key].on_disk]
        if not keys:
            return set()
        kept = set(self._disk.delete_many([BlockKey(key) for key in keys]).kept)  # type: ignore[union-attr]
        for key in keys:
            if key in kept:
                self._entries[key].stored = True
            else:
                self._disk_gone(key)
        if evicting:
            self.evictions["disk"] += len(keys) - len(kept)
        return kept

    def _disk_gone(self, key: Digest) -> None:
        """The disk copy of ``key`` was deleted: un-count it, forget the block if no copy is left."""
        entry = self._entries[key]
        entry.on_disk, entry.disk_pending = False, None
        self._recent["disk"].pop(key, None)
        self._disk_count -= 1
        if not self._where(key):
            self._forget(key)

    def _apply_store_changes(self, result: CommitResult) -> None:
        """Follow what a session commit / delete / reclaim changed in the store (lock held)."""
        get = self._entries.get
        for key in result.newly_referenced:
            if (entry := get(key)) is not None:
                entry.stored = True
        for key in result.unreferenced:
            if (entry := get(key)) is not None:
                entry.stored = False
        for key in result.deleted:
            if (entry := get(key)) is not None:
                entry.stored = False
                if entry.on_disk:
                    self._disk_gone(key)

    def _write_disk(self, keys: list[Digest], blocks: torch.Tensor | None, *, sync: bool, encoded: torch.Tensor | None = None,
                    later: bool = False) -> None:  # fmt: skip
        """Write reserved records of raw ``blocks``, or of payloads ``encoded`` already in the
        disk's encoding (``[n, payload bytes]`` uint8); ``sync`` waits until durable (raising,
        reservation returned). ``later`` (not ``sync``; ``blocks`` a copy of the caller's own):
        a lossy disk encodes them on its encoder thread, not under our lock."""
        disk = self._open_disk()
        if sync:
            try:
                if encoded is not None:
                    disk.submit_put_encoded([BlockKey(key) for key in keys], encoded).result()
                else:
                    disk.put_many([BlockKey(key) for key in keys], blocks.cpu())  # type: ignore[union-attr]
            except BaseException:
                self._disk_count -= len(keys)
                raise
            future = None
        else:
            named = [BlockKey(key) for key in keys]
            if encoded is not None:
                future = disk.submit_put_encoded(named, encoded)
            else:
                future = (disk.submit_put_later if later else disk.submit_put_many)(named, blocks)  # type: ignore[arg-type]
            # drop write-throughs that landed; failed ones stay for _flush_pending to un-mark and report
            self._pending = [(ks, f) for ks, f in self._pending if not (f.done() and f.exception() is None)]
            self._pending.append((list(keys), future))
        for key in keys:
            entry = self._entries[key]
            entry.on_disk, entry.disk_pending = True, future
            self._recent["disk"][key] = None
        self.moved["host->disk"] += self.layout.nbytes * len(keys)

    def _wait_disk_write(self, entry: Entry) -> None:
        """Before reading a block from disk: its write-through must have landed (no lock needed)."""
        future = entry.disk_pending
        if future is not None:
            future.result()

    def _flush_pending(self) -> None:
        """Wait for every write-through; a failed one un-marks its blocks (they are still above)."""
        with self._cond:
            pending, self._pending = self._pending, []
        errors = []
        for keys, future in pending:
            try:
                future.result()
            except TierError as error:
                errors.append(error)
            with self._cond:
                for key in keys:
                    entry = self._entries.get(key)
                    if entry is not None and entry.disk_pending is future:
                        entry.disk_pending = None
                        if future.exception() is not None:
                            entry.on_disk = False
                            self._disk_count -= 1
                            self._recent["disk"].pop(key, None)
        if errors:
            raise errors[0]
