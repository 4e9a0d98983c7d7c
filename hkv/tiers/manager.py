"""The tier manager: the only object that moves blocks between tiers.

Placement. A block lives in one or more tiers (a disk copy plus a host cache copy, say). ``put``
places it on the device; when a tier is full, the eviction policy picks a victim among the
tier's unpinned, idle blocks and the victim is *dropped* if it has a copy elsewhere, else
*moved down* (device -> host -> disk). Nothing is dropped without a copy: a move that finds no
room anywhere raises TierFullError. The disk budget evicts (``tiers.disk_full = "evict"``)
only blocks that no live sequence references (refcount 0, see :meth:`retain`) and no committed
session references (``Entry.stored``, loaded from the store's ``refs`` when it is opened; the
store itself also refuses to delete them), LRU first; then, with ``store.evict_sessions``, the
KV of least-recently-used sessions through the reclaimer the session layer sets.

Concurrency. One lock (a Condition) guards the metadata: pools' slot maps, entries, counters.
Moving blocks *up* (``promote`` from the prefetcher's threads, and ``gather``'s on-demand
fetches) is three phases: plan under the lock (mark the blocks busy, reserve slots), copy
without the lock (disk reads, host -> device copies), then commit under the lock (assign slots,
clear busy, notify). A busy block is never evicted, deleted or moved by anyone else; a gather
that needs it waits on the condition. A gather "holds" its blocks so that concurrent promotions
cannot evict them while it reads. Nothing waits for an event or a future while holding the lock
except the disk writer's futures, and the writer never takes this lock, so there is no deadlock.
Moves down (evictions, demotions, spills) are rarer and run under the lock.
"""

from __future__ import annotations

import gc
import logging

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..blocks import BlockKey, BlockLayout
from ..config import Config, ConfigError, TiersConfig
from ..store.files import filesystem_bytes
from ..store.txn import CommitResult
from .base import TierError, TierFullError
from .copies import CopyEngine
from .device import DeviceTier, resolve_device
from .disk import DiskTier
from .host import HostTier
from .placement import Digest, Entry
from .promotion import GatherReport, Promotion
from .remote_blocks import RemoteBlocks, RemoteSource
from .slot_codec import SlotCodec
from .policy import make_policy
from .pool import SharedRows

TIER_NAMES = ("device", "host", "disk")
__all__ = ["GatherReport", "ManagerStats", "TIER_NAMES", "TierManager", "TierUsage"]
log = logging.getLogger(__name__)


def check_disk_budget(tiers: TiersConfig) -> None:
    """ConfigError naming ``tiers.disk`` when it is larger than the whole filesystem holding
    ``tiers.path`` (a budget the disk can never hold); cheap, so callers check it before
    loading a model."""
    room = filesystem_bytes(Path(tiers.path))
    if int(tiers.disk) > room:
        raise ConfigError(
            f"tiers.disk = {int(tiers.disk)} bytes ({int(tiers.disk) / 2**30:.2f} GiB) is larger than the whole filesystem "
            f"holding tiers.path = {str(tiers.path)!r} ({room} bytes, {room / 2**30:.2f} GiB); lower tiers.disk"
        )


@dataclass(slots=True)
class TierUsage:
    """Occupancy of one tier."""

    used_bytes: int
    capacity_bytes: int
    blocks: int


@dataclass(slots=True)
class ManagerStats:
    """Snapshot returned by :meth:`TierManager.stats`. Byte counts are payload bytes, except the
    disk tier's used/capacity, which count its records (64-byte header + payload), as its budget does."""

    tiers: dict[str, TierUsage]
    moved_bytes: dict[str, int] = field(default_factory=dict)  # "host->device", "device->host", "disk->host", "host->disk"
    evictions: dict[str, int] = field(default_factory=dict)  # per tier name
    blocks: int = 0  # distinct blocks known to the manager


class TierManager(Promotion):
    """Places blocks of one layout across device, host and disk within the config's budgets.

    Invariants: a tier never exceeds its budget; a block put is in at least one tier until it
    is deleted (or the disk policy evicts it while unreferenced); a block read back is bitwise
    the block put. Thread-safe.
    """

    def __init__(self, config: Config, layout: BlockLayout, *, device: torch.device | str | None = None) -> None:
        """Budgets from ``config.tiers`` (ConfigError naming the key when one is smaller than a
        block; HostMemoryError with the figures when the host budget exceeds free RAM). The device
        tier lives on ``device``, else ``tiers.accelerator`` (auto: cuda if available, else cpu).
        The disk store at ``tiers.path`` is opened now if it exists, else when first needed."""
        tiers = config.tiers
        layout.check_budgets({"device": int(tiers.device), "disk": int(tiers.disk)})
        host_slot = SlotCodec(layout, tiers.host_encoding).slot_nbytes
        if int(tiers.host) < host_slot:
            raise ConfigError(f"tiers.host = {int(tiers.host)} bytes: smaller than one block ({host_slot} bytes as "
                              f"tiers.host_encoding = {tiers.host_encoding!r}; {layout.describe()})")  # fmt: skip
        record = layout.encoded_record_nbytes(tiers.disk_encoding)
        if int(tiers.disk) < record:
            raise ConfigError(f"tiers.disk = {int(tiers.disk)} bytes: smaller than one disk record ({record} bytes)")
        check_disk_budget(tiers)
        self.config, self.layout = config, layout
        self.device = torch.device(device) if device is not None else resolve_device(tiers.accelerator)
        self.persist = config.store.persist
        self.path = Path(tiers.path)
        super().__init__(
            DeviceTier(layout, int(tiers.device), self.device),
            HostTier(layout, int(tiers.host), pin_memory=self.device.type == "cuda", encoding=tiers.host_encoding),
            CopyEngine(self.device, layout),
            make_policy(tiers.policy),
            layout=layout,
            disk_capacity=int(tiers.disk),
            disk_full=tiers.disk_full,
            evict_sessions=config.store.evict_sessions,
            disk_record_nbytes=record,
        )
        if self.device.type == "cpu" and not self.host_pool.codec.lossy:  # both pools RAM: one tensor, tables read either
            self.shared_rows = SharedRows(self.device_pool, self.host_pool)
        self._closed = False
        self.remote_blocks = RemoteBlocks()  # blocks of lazily pulled sessions, still on the remote tier
        if self.has_store():  # a store from an earlier run: its blocks are known
            self._open_disk()

    # -- the disk tier, opened when first needed --------------------------------------------------
    def _open_disk(self) -> DiskTier:
        if self._disk is None:
            self._disk = DiskTier(self.path, self.layout, self.disk_capacity, writer_batch=self.config.store.writer_batch,
                                  direct_reads=self.config.store.direct_reads, segments=self.config.store.segments,
                                  aio_reads=self.config.store.aio_reads,
                                  encoding=self.config.tiers.disk_encoding)  # fmt: skip
            self._learn_disk_keys(self._disk.key_digests())
            for key in self._disk.referenced_keys():
                entry = self._entries.get(key)
                if entry is not None:
                    entry.stored = True
        return self._disk

    def _learn_disk_keys(self, digests: list[Digest]) -> None:
        """Entries for the records a store opened with (lock held): one loop without the garbage
        collector, whose passes over a growing heap were most of it (122,880 entries at 256K
        tokens: 0.65 s under cProfile)."""
        entries, collecting = self._entries, gc.isenabled()
        gc.disable()
        try:
            for digest in digests:
                entry = entries.get(digest)
                if entry is None:
                    entry = entries[digest] = Entry()
                entry.on_disk = True
        finally:
            if collecting:
                gc.enable()
        self._recent["disk"].update(dict.fromkeys(digests))
        self._disk_count += len(digests)

    def has_store(self) -> bool:
        """Whether the disk store exists (opened here, or left at ``tiers.path`` by an earlier run)."""
        return self._disk is not None or (self.path / "data.mdb").exists()

    @property
    def store(self) -> DiskTier:
        """The disk store (opened, or created, now if it was not yet): the blocks and the rows
        beside them (refs, summaries, sessions) that the layers above read and write."""
        with self._cond:
            self._check_open()
            return self._open_disk()

    def apply_store_changes(self, result: CommitResult) -> None:
        """Follow a session commit / delete / reclaim: blocks newly referenced are ``stored``
        (never evicted from disk), unreferenced ones evictable again, deleted ones no longer on
        disk (forgotten when that was their only copy)."""
        with self._cond:
            self._apply_store_changes(result)

    def learn_stored(self, keys: Sequence[BlockKey]) -> int:
        """Register blocks that another process stored after this manager opened the store.

        ``keys``: blocks that may be in the store (prefix adoption's candidates). Those
        unknown here get an entry with their disk copy (``stored`` when a session references
        them). Returns how many leading ``keys`` the manager now knows."""
        known = self.known(keys)
        return next((i for i, ok in enumerate(known) if not ok), len(keys))

    def known(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Per key, whether the manager knows the block (in a tier, or in the store: those
        another process stored are registered first, as :meth:`learn_stored` does)."""
        with self._cond:
            self._check_open()
            unknown = [key for key in keys if key.digest not in self._entries]
            if unknown:
                disk = self._open_disk()
                present = [key for key in unknown if disk.contains(key)]
                refs = disk.refs(present) if present else []
                for key, count in zip(present, refs):
                    entry = self._entry_for(key.digest)
                    entry.on_disk, entry.stored = True, count > 0
                    self._recent["disk"][key.digest] = None
                self._disk_count += len(present)
            return [key.digest in self._entries for key in keys]

    def learn_remote(self, keys: Sequence[BlockKey], source: RemoteSource) -> None:
        """Register blocks a lazily pulled session references that the local store lacks: known
        as on disk, brought from ``source`` into the local store before their first read
        (:mod:`.remote_blocks`). Keys the manager knows already are left as they are."""
        with self._cond:
            self._check_open()
            self._open_disk()
            added = [key.digest for key in keys if key.digest not in self._entries]
            for key in added:
                self._entry_for(key).on_disk = True
                self._recent["disk"][key] = None
            self._disk_count += len(added)
        self.remote_blocks.add(added, source)

    def forget_remote(self, source: RemoteSource) -> None:
        """Stop bringing ``source``'s blocks (its session closed, or is pulled whole): those that
        never reached the local store are forgotten, but those another live sequence references
        (a lazily pulled session sharing the prefix), which stay registered with ``source``."""
        gone = self.remote_blocks.remove(source)
        shared = []
        with self._cond:
            for key in gone:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry.refs or entry.holds or entry.busy:
                    shared.append(key)
                    continue
                if not (self.device_pool.contains(key) or self.host_pool.contains(key)):
                    self._forget(key)
                    self._disk_count -= 1
                else:
                    entry.on_disk = False
        self.remote_blocks.add(shared, source)

    def in_use(self, key: Digest) -> bool:
        """Whether a live sequence references the block (digest), or a move or gather has it.
        Reads without the lock (the disk writer thread calls it while the lock may be held)."""
        entry = self._entries.get(key)
        return entry is not None and (entry.refs > 0 or entry.busy or entry.holds > 0)

    def set_reclaimer(self, reclaimer: Callable[[int], CommitResult] | None) -> None:
        """``reclaimer(need_bytes)``: frees disk records by dropping sessions' KV (the session
        layer binds SessionStore.reclaim with its open sessions as ``skip`` and :meth:`in_use`);
        called with the manager's lock held when unreferenced blocks cannot make room."""
        with self._cond:
            self._reclaimer = reclaimer

    # -- insert ---------------------------------------------------------------------------------
    def put(self, key: BlockKey, block: torch.Tensor, *, pin: bool = False) -> None:
        """Insert a sealed block (copied). Goes to the device tier (evicting unpinned blocks
        down the tiers if needed); ``pin`` keeps it on the device until :meth:`unpin`.
        With ``store.persist`` it is also written through to disk. Re-putting a known key is a
        no-op apart from pinning and recency."""
        self.put_many([key], block.unsqueeze(0), pin=pin)

    def put_many(self, keys: Sequence[BlockKey], blocks: torch.Tensor, *, pin: bool = False, persist: bool = False) -> None:
        """``blocks``: ``[n, 2, kv_heads, block_tokens, head_dim]``. Raises TierFullError (and
        stores none of the new blocks) when they fit nowhere, or the write-through is refused.
        ``persist``: write these blocks through to disk even without ``store.persist`` (known
        ones too, if they have no disk copy); the write is durable before any later disk
        transaction (a session commit) of this process."""
        if tuple(blocks.shape) != (len(keys), *self.layout.shape) or blocks.dtype != self.layout.dtype:
            raise ValueError(
                f"put_many: {len(keys)} keys and blocks {tuple(blocks.shape)} {blocks.dtype}; expected "
                f"[n, {', '.join(map(str, self.layout.shape))}] {self.layout.dtype}"
            )
        keys = [key.digest for key in keys]  # internally blocks are known by their digest (a cheap hash)
        with self._cond:
            self._check_open()
            first: dict[Digest, int] = {}
            for i, key in enumerate(keys):
                first.setdefault(key, i)
            claimed = self._claim_remote(list(first)) if self.remote_blocks else set()
            known = [key for key in first if key in self._entries and key not in claimed]
            if pin:
                wanted = len(first) - len(known) + sum(not self._entries[key].pinned for key in known)
                room = self.device_pool.n_slots - self._pinned_count
                if wanted > room:
                    raise TierFullError(
                        f"cannot pin {wanted} more blocks: {room} unpinned device slots "
                        f"(tiers.device = {self.device_pool.capacity_bytes} bytes, {self._pinned_count} blocks pinned)"
                    )
                newly_pinned = [key for key in known if not self._entries[key].pinned]
            for key in known:
                self._touch(key)
        if pin and newly_pinned:
            self._pin(newly_pinned)  # first, so that a failure leaves nothing new stored
        try:
            with self._cond:
                self._check_open()
                new = [key for key in first if key not in self._entries or key in claimed]
                if persist:  # first: a refusal leaves nothing new stored
                    self._write_through_known([key for key in first if key not in new], blocks, first)
                if new:
                    keep = set(first) if persist else set()  # the known blocks just written through
                    self._insert(new, blocks, [first[key] for key in new], pin, persist or self.persist, keep)
        except BaseException:
            if pin and newly_pinned:
                self._unpin(newly_pinned)
            raise

    def _claim_remote(self, keys: list[Digest]) -> set[Digest]:
        """Blocks of ``keys`` registered as remote-backed but never brought (lock held): the data
        being put replaces the remote copy (a recompute after a lost block). Their entries keep
        their references and lose the disk copy they never had."""
        claimed = self.remote_blocks.claim(keys)
        for key in claimed:
            entry = self._entries.get(key)
            if entry is not None and entry.on_disk:
                entry.on_disk = False
                self._recent["disk"].pop(key, None)
                self._disk_count -= 1
        return {key for key in claimed if key in self._entries}

    def _write_through_known(self, keys: list[Digest], blocks: torch.Tensor, first: dict[Digest, int]) -> None:
        """Write known blocks without a disk copy through to disk (lock held). TierFullError.
        A busy block (being moved up) is written too: the data comes from ``blocks``, and a
        session about to commit it needs its disk copy."""
        keys = [key for key in keys if not self._entries[key].on_disk]
        if keys:
            self._disk_reserve(len(keys), set(first))
            self._write_disk(keys, blocks[[first[key] for key in keys]], sync=False)

    def _insert(
        self, keys: list[Digest], blocks: torch.Tensor, rows: list[int], pin: bool, persist: bool, keep: set[Digest]
    ) -> None:
        """Place new blocks (lock held): device first, then host, then disk; all or none.
        ``persist``: write them all through to disk too. ``keep``: known blocks not to evict meanwhile."""
        exclude, reserved_disk = set(keys) | keep, 0
        dev: list[int] = []
        host: list[int] = []
        try:
            if persist:
                reserved_disk = self._disk_reserve(len(keys), exclude)  # refused before anything changes
            dev = self._make_room("device", len(keys), exclude)
            if pin and len(dev) < len(keys) and self.device_pool.reserved_slots() > len(dev):
                # Slots reserved by moves in flight (the prefetcher's promotions) cannot be evicted
                # yet: wait for those moves, then try again, so that a pin never fails by timing.
                for slot in dev:
                    self.device_pool.unreserve(slot)
                self._cond.wait_for(lambda: self.device_pool.reserved_slots() == 0, timeout=30.0)
                dev = self._make_room("device", len(keys), exclude)
            if pin and len(dev) < len(keys):
                raise TierFullError(
                    f"cannot pin {len(keys)} new blocks: only {len(dev)} device slots free or evictable "
                    f"(tiers.device = {self.device_pool.capacity_bytes} bytes, {self._pinned_count} blocks pinned)"
                )
            if len(dev) < len(keys):
                host = self._make_room("host", len(keys) - len(dev), exclude)
            rest = len(keys) - len(dev) - len(host)
            if rest and not persist:
                reserved_disk = self._disk_reserve(rest, exclude)
        except BaseException as error:  # a disk write failing while making room too: give all back
            self._unreserve(dev, host, reserved_disk)
            if isinstance(error, TierFullError):
                raise TierFullError(f"cannot insert {len(keys)} blocks: {error}") from None
            raise
        for key in keys:
            entry, old = Entry(), self._entries.get(key)
            if old is not None:  # a remote-backed block recomputed (put_many): the live sequences' references stay
                entry.refs = old.refs
            self._entries[key] = entry
        # The newest blocks of the batch go highest: disk gets the oldest, the device the newest.
        n, low = len(keys), len(keys) - len(dev) - len(host)
        if low:  # only the disk has room: write them first, durably, so a failure leaves nothing stored
            self._host_overflowed = True
            try:
                self._write_disk(keys[:low], blocks[rows[:low]], sync=True)  # returns its `low` reservation on failure
            except BaseException:
                for key in keys:
                    self._forget(key)
                self._unreserve(dev, host, reserved_disk - low)
                raise
        self._pool_write("device", keys[n - len(dev) :], dev, blocks, rows[n - len(dev) :])
        self._pool_write("host", keys[low : n - len(dev)], host, blocks, rows[low : n - len(dev)])
        if self._host_overflowed and not persist and len(dev) < n - low:
            self._copy_to_disk_later(keys[low : n - len(dev)])
        if pin:
            for key in keys:
                self._entries[key].pinned = True
            self._pinned_count += len(keys)
        if persist and low < n:
            self._write_disk(keys[low:], blocks[rows[low:]], sync=False)

    def _unreserve(self, dev: list[int], host: list[int], disk_records: int) -> None:
        """Give back slots and disk records reserved for an insert that failed (lock held)."""
        for slot in dev:
            self.device_pool.unreserve(slot)
        for slot in host:
            self.host_pool.unreserve(slot)
        self._disk_count -= disk_records

    # -- lookups --------------------------------------------------------------------------------
    def contains(self, key: BlockKey) -> bool:
        with self._cond:
            return key.digest in self._entries

    def where(self, key: BlockKey) -> frozenset[str]:
        """Names of the tiers holding the block (empty if unknown)."""
        with self._cond:
            return self._where(key.digest)

    def gather_capacity(self) -> int:
        """Most blocks one :meth:`gather` can take (device slots not pinned)."""
        with self._cond:
            return self.device_pool.n_slots - self._pinned_count

    def read(self, key: BlockKey) -> torch.Tensor:
        """A CPU copy of the block, from whichever tier holds it (no promotion)."""
        key = key.digest
        if self.remote_blocks:
            self.remote_blocks.ensure([key], strict=True)
        with self._cond:
            self._check_open()
            entry = self._get(key)
            self._cond.wait_for(lambda: not entry.busy)
            entry = self._get(key)
            if self.device_pool.contains(key):
                self.copies.order_after([entry.event])
                return self.device_pool.view(key).cpu().clone()
            if self.host_pool.contains(key):
                return self.host_pool.block(key)
            entry.busy = True  # the disk read runs without the lock; nobody may delete it meanwhile
        try:
            out = torch.empty(self.layout.shape, dtype=self.layout.dtype)
            self._wait_disk_write(entry)
            records = self.remote_blocks.records([key]) if self.remote_blocks else None
            self._disk.get_many_into([BlockKey(key)], out.unsqueeze(0), records=records)
            return out
        finally:
            with self._cond:
                entry.busy = False
                self._cond.notify_all()

    # -- moving down, pinning, deleting ---------------------------------------------------------
    def demote(self, keys: Sequence[BlockKey], to: str = "host") -> None:
        """Move blocks down to ``to`` ("host" or "disk"), dropping the copies above it.

        Pinned blocks, and blocks a gather holds, stay where they are. Raises TierFullError
        (nothing dropped) when ``to`` has no room for them."""
        if to not in ("host", "disk"):
            raise ValueError(f"demote: to = {to!r} must be 'host' or 'disk'")
        keys = [key.digest for key in keys]
        with self._cond:
            self._check_open()
            entries = self._entries_of(keys)
            if any(entry.busy for entry in entries.values()):
                self._cond.wait_for(lambda: not any(entry.busy for entry in entries.values()))
            alive = self._entries
            todo = [key for key, entry in entries.items() if not (entry.pinned or entry.holds) and key in alive]
            exclude = set(todo)
            if to == "host":
                on_device, on_host = self.device_pool.slot_map, self.host_pool.slot_map
                drops, movers = [], []
                for key in todo:
                    if key in on_device:
                        (drops if key in on_host else movers).append(key)
                self._drop_many("device", drops)
                moved = self._move_down("device", movers, exclude, count=False) if movers else []
                if len(moved) < len(movers):
                    raise TierFullError(f"demote: no room in host or disk for {len(movers) - len(moved)} of {len(movers)} blocks")
                return
            writes = [key for key in todo if not self._safe_on_disk(entries[key], key)]
            if writes:
                self._disk_reserve(len(writes), exclude)
                on_device = self.device_pool.slot_map
                from_host = [key for key in writes if key not in on_device]  # written from their host slots
                from_device = [key for key in writes if key in on_device]
                if from_host:
                    self._spill(from_host)
                if from_device:
                    self._write_disk(from_device, torch.stack([self._cpu_copy(key) for key in from_device]), sync=True)
            for key in todo:
                for tier in ("device", "host"):
                    if self._pool(tier).contains(key):
                        self._drop(tier, key)

    def pin(self, keys: Sequence[BlockKey]) -> None:
        """Bring blocks to the device and keep them there until :meth:`unpin`. Raises
        TierFullError (nothing pinned) when the device has no unpinned room for them."""
        self._pin([key.digest for key in keys])

    def _pin(self, keys: list[Digest]) -> None:
        unique = list(dict.fromkeys(keys))
        with self._cond:
            self._check_open()
            entries = [self._get(key) for key in unique]
            for entry in entries:
                entry.holds += 1
        try:
            self._fetch(unique, entries)
            with self._cond:
                absent = [key for key in unique if not self.device_pool.contains(key)]
                if absent:
                    raise TierFullError(f"cannot pin {len(absent)} blocks: no unpinned device room ({self._pinned_count} blocks pinned)")
                for entry in entries:
                    if not entry.pinned:
                        entry.pinned = True
                        self._pinned_count += 1
        finally:
            self._unhold(entries)

    def unpin(self, keys: Sequence[BlockKey]) -> None:
        """Let blocks be evicted again; unknown or unpinned keys are ignored."""
        self._unpin([key.digest for key in keys])

    def _unpin(self, keys: list[Digest]) -> None:
        with self._cond:
            for key in dict.fromkeys(keys):
                entry = self._entries.get(key)
                if entry is not None and entry.pinned:
                    entry.pinned = False
                    self._pinned_count -= 1

    def note_scores(self, keys: Sequence[BlockKey], scores: torch.Tensor) -> None:
        """Recent attention scores of blocks, for the score-aware eviction policy."""
        values = torch.as_tensor(scores).detach().reshape(-1).float().cpu().tolist()
        if len(values) != len(keys):
            raise ValueError(f"note_scores: {len(keys)} keys but {len(values)} scores")
        with self._cond:
            self.policy.note_scores([key.digest for key in keys], values)

    def retain(self, keys: Sequence[BlockKey]) -> None:
        """Count a live sequence's reference to each block (duplicates count twice): referenced
        blocks are never evicted from disk by the disk budget."""
        with self._cond:
            get = self._entries.get  # a restored 256K-token session retains 122,880 blocks
            entries = [get(key.digest) for key in keys]
            if None in entries:
                self._get(keys[entries.index(None)].digest)  # raises, naming the block
            for entry in entries:
                entry.refs += 1

    def release(self, keys: Sequence[BlockKey]) -> None:
        """Drop references taken by :meth:`retain`. Without ``store.persist`` the disk is a spill
        tier only: a block whose last reference goes loses its disk copy (and is forgotten
        if that was its only copy)."""
        counts = Counter(key.digest for key in keys)
        with self._cond:
            entries = [(key, self._get(key), n) for key, n in counts.items()]
            for key, entry, n in entries:
                if entry.refs < n:
                    raise ValueError(f"release: block {key.hex()} is retained {entry.refs} times, released {n}")
            drop = []
            for key, entry, n in entries:
                entry.refs -= n
                if entry.refs == 0 and not self.persist and entry.on_disk and not entry.stored:
                    drop.append(key)
            if drop:
                # like delete: not while a gather/pin holds one or a move has it busy (it would vanish under them)
                self._cond.wait_for(
                    lambda: not any(self._entries[k].busy or self._entries[k].holds for k in drop if k in self._entries)
                )
                entries_now = self._entries
                drop = [k for k in dict.fromkeys(drop) if k in entries_now and entries_now[k].refs == 0 and not entries_now[k].stored]
                self._delete_disk_copies(drop)

    def delete(self, keys: Sequence[BlockKey]) -> None:
        """Remove blocks from every tier; unknown keys are ignored. Waits for moves of them.
        The disk copy of a block a committed session references stays (and so does the block)."""
        with self._cond:
            self._check_open()
            unique = [key for key in dict.fromkeys(key.digest for key in keys) if key in self._entries]
            self._cond.wait_for(lambda: not any(self._entries[k].busy or self._entries[k].holds for k in unique if k in self._entries))
            unique = [key for key in unique if key in self._entries]
            for key in unique:
                for tier in ("device", "host"):
                    if self._pool(tier).contains(key):
                        self._drop(tier, key)
            kept = self._delete_disk_copies(unique)
            for key in unique:
                if key not in kept:
                    self._forget(key)

    def flush(self) -> None:
        """Wait until every write-through to disk is committed (raises the first failure)."""
        self._flush_pending()
        if self._disk is not None:
            self._disk.flush()

    def stats(self) -> ManagerStats:
        with self._cond:
            usage = {
                "device": TierUsage(self.device_pool.used_bytes(), self.device_pool.capacity_bytes, len(self.device_pool)),
                "host": TierUsage(self.host_pool.used_bytes(), self.host_pool.capacity_bytes, len(self.host_pool)),
                "disk": TierUsage(self._disk_count * self.disk_record_nbytes, self.disk_capacity, self._disk_count),
            }
            return ManagerStats(usage, dict(self.moved), dict(self.evictions), len(self._entries))

    def close(self) -> None:
        """Flush, stop background threads, close the store. Idempotent. A write-through that
        failed (a full disk) is logged, not raised: the blocks it held were a cache of what is
        above (a session's own blocks fail its commit, which reported it)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        try:
            self._flush_pending()
        except TierError as error:
            log.warning("closing the tiers: blocks written through to disk were not stored: %s", error)
        finally:
            if self._disk is not None:
                self._disk.close()
            self.device_pool.close()
            self.host_pool.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TierError("the tier manager is closed")

    def __enter__(self) -> TierManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
