"""How block bytes cross between host and device: streams, events and staging buffers.

On CUDA, host -> device moves run on one dedicated copy stream (``hkv-h2d``) from pinned
memory; each move records one ``torch.cuda.Event`` that consumers order on with
``Stream.wait_event`` -- nothing on the hot path calls ``synchronize()``. Before the copy
stream overwrites device slots it waits on the last "use" event recorded by a gather, so a
slot that a queued ``index_select`` still reads is never overwritten early. Device -> host
moves (demotions) are rare, cold-path and blocking: the host copy must be complete before the
block's device slot is given away.

Without CUDA every copy is a plain synchronous ``copy_`` on the calling thread and events are
``None``.

An encoded host pool (``tiers.host_encoding``) moves its payload bytes, not raw blocks: a
demotion encodes on the device before the device -> host copy, a promotion copies the payload
up and decodes it on the device, on the copy stream, ordered by the same event.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import torch

from ..blocks import BlockLayout
from .pool import SlotPool, copy_slots, runs
from .slot_codec import SlotCodec


class CopyEngine:
    """Copies between the host and device pools of one manager."""

    def __init__(self, device: torch.device, layout: BlockLayout) -> None:
        self.device = device
        self.layout = layout
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None  # the hkv-h2d copy stream
        self._use_event: torch.cuda.Event | None = None  # last gather's reads of device slots
        self._lock = threading.Lock()

    def staging(self, n: int, codec: SlotCodec | None = None) -> torch.Tensor:
        """A CPU buffer ``[n, *layout.shape]`` (``[n, *codec.slot_shape]`` of ``codec.slot_dtype``
        when given), pinned on CUDA (the caching host allocator keeps it alive until the copies
        reading it complete)."""
        if codec is not None:
            return torch.empty((n, *codec.slot_shape), dtype=codec.slot_dtype, pin_memory=self.cuda)
        return torch.empty((n, *self.layout.shape), dtype=self.layout.dtype, pin_memory=self.cuda)

    def to_device(
        self, dst: torch.Tensor, dst_slots: Sequence[int], src: torch.Tensor, src_slots: Sequence[int],
        codec: SlotCodec | None = None,
    ) -> torch.cuda.Event | None:  # fmt: skip
        """``dst[dst_slots] = src[src_slots]`` (host -> device); returns the event that marks its end.
        ``codec``: how ``src``'s slots hold blocks, when encoded (they are decoded on the device).

        On CUDA the copy is queued on the copy stream (callable from any thread) and the returned
        event is what readers must ``wait_event`` on; ``src`` must stay unchanged until then.
        """
        if not dst_slots:
            return None
        lossy = codec is not None and codec.lossy
        if not self.cuda:
            if lossy:
                decode_slots(codec, dst, dst_slots, src, src_slots)  # type: ignore[arg-type]
            else:
                copy_slots(dst, dst_slots, src, src_slots)
            return None
        with self._lock:
            use = self._use_event
        with torch.cuda.stream(self.stream):
            if use is not None:
                self.stream.wait_event(use)
            if lossy:  # the payload crosses (fewer bytes), the decode runs here, on the copy stream
                picked = src.index_select(0, torch.as_tensor(src_slots, dtype=torch.long)).pin_memory()
                blocks = codec.decode(picked.to(self.device, non_blocking=True))  # type: ignore[union-attr]
                dst.index_copy_(0, torch.as_tensor(dst_slots, dtype=torch.long).to(self.device, non_blocking=True), blocks)
            else:
                copy_slots(dst, dst_slots, src, src_slots, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def to_host(
        self,
        dst: SlotPool,
        dst_slots: Sequence[int],
        src: torch.Tensor,
        src_slots: Sequence[int],
        events: Iterable[torch.cuda.Event | None] = (),
    ) -> None:
        """``dst``'s slots ``dst_slots`` = the raw blocks ``src[src_slots]`` (device -> host, or a
        staging buffer -> host), encoded on ``src``'s device first when ``dst`` is; complete on return."""
        if not dst_slots:
            return
        self.order_after(events)
        if not dst.codec.lossy:
            copy_slots(dst.data, dst_slots, src, src_slots)  # blocking: the host bytes are final on return
            return
        picked = src.index_select(0, torch.as_tensor(src_slots, dtype=torch.long, device=src.device))
        dst.write_slots(dst_slots, picked, range(len(dst_slots)))

    def order_after(self, events: Iterable[torch.cuda.Event | None]) -> None:
        """Make the current stream wait for ``events`` (no host-side wait)."""
        if not self.cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        seen: set[int] = set()
        for event in events:
            if event is not None and id(event) not in seen:
                seen.add(id(event))
                stream.wait_event(event)

    def mark_use(self) -> None:
        """Record that the current stream has queued reads of device slots (after a gather)."""
        if not self.cuda:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self._use_event = event

    @staticmethod
    def wait_host(event: torch.cuda.Event | None) -> None:
        """Block until a copy reading a host slot is done (before the slot is reused; cold path)."""
        if event is not None:
            event.synchronize()


def decode_slots(codec: SlotCodec, dst: torch.Tensor, dst_slots: Sequence[int], src: torch.Tensor, src_slots: Sequence[int]) -> None:
    """``dst[dst_slots[i]] = decode(src[src_slots[i]])`` on one device, a run of consecutive slots at a time."""
    for d, s, n in runs(dst_slots, src_slots):
        codec.decode_into(src[s : s + n], dst[d : d + n])
