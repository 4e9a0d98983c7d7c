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
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import torch

from ..blocks import BlockLayout
from .pool import copy_slots


class CopyEngine:
    """Copies between the host and device pools of one manager."""

    def __init__(self, device: torch.device, layout: BlockLayout) -> None:
        self.device = device
        self.layout = layout
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None  # the hkv-h2d copy stream
        self._use_event: torch.cuda.Event | None = None  # last gather's reads of device slots
        self._lock = threading.Lock()

    def staging(self, n: int) -> torch.Tensor:
        """A CPU buffer ``[n, *layout.shape]``, pinned on CUDA (the caching host allocator keeps it
        alive until the copies reading it complete)."""
        return torch.empty((n, *self.layout.shape), dtype=self.layout.dtype, pin_memory=self.cuda)

    def to_device(
        self, dst: torch.Tensor, dst_slots: Sequence[int], src: torch.Tensor, src_slots: Sequence[int]
    ) -> torch.cuda.Event | None:
        """``dst[dst_slots] = src[src_slots]`` (host -> device); returns the event that marks its end.

        On CUDA the copy is queued on the copy stream (callable from any thread) and the returned
        event is what readers must ``wait_event`` on; ``src`` must stay unchanged until then.
        """
        if not dst_slots:
            return None
        if not self.cuda:
            copy_slots(dst, dst_slots, src, src_slots)
            return None
        with self._lock:
            use = self._use_event
        with torch.cuda.stream(self.stream):
            if use is not None:
                self.stream.wait_event(use)
            copy_slots(dst, dst_slots, src, src_slots, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def to_host(
        self,
        dst: torch.Tensor,
        dst_slots: Sequence[int],
        src: torch.Tensor,
        src_slots: Sequence[int],
        events: Iterable[torch.cuda.Event | None] = (),
    ) -> None:
        """``dst[dst_slots] = src[src_slots]`` (device -> host), complete on return."""
        if not dst_slots:
            return
        self.order_after(events)
        copy_slots(dst, dst_slots, src, src_slots)  # blocking: the host bytes are final on return

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
