"""Image upload (img_mgmt upload, group 1 command 1): windowed, self-tuning, go-back-N.

Entry points: :meth:`gateway.smp.session.SMPSession.upload` (builds a :class:`WindowedUpload`)
and :func:`upload_plan` (what an upload would start with, and why: ``smp-gateway probe``).
The *decisions* (start packet size and window, when they step down or grow, what is
remembered per device) are in ``tuning.py``; this module carries them out.

What Zephyr does with upload requests (read in the sources, not guessed):

* ``smp.c``: requests and responses share one pool of ``CONFIG_MCUMGR_TRANSPORT_NETBUF_COUNT``
  (``buf_count``) netbufs of ``buf_size`` bytes; requests are queued in a FIFO and handled one
  at a time by the SMP work queue, and handling one allocates its response buffer. So at most
  ``buf_count - 1`` requests can be held by the device; when no buffer is left for an answer
  the request's own buffer carries ``{"rc": ENOMEM}`` back.
* ``smp_udp.c``: a datagram that arrives when the pool is empty is dropped ("Failed to allocate
  mcumgr buffer"): a window larger than ``buf_count - 1`` turns into losses.
* ``serial_util.c`` (``mcumgr_serial_process_frag``): each base64 line is decoded as it comes
  into one netbuf that holds the 2-byte frame length, the packet and the CRC16 (a start line
  resets it): a serial SMP packet is at most ``buf_size - 4`` bytes.
* ``uart_mcumgr.c`` (``uart_mcumgr_rx_byte``): the UART ISR stores each line in one of
  ``CONFIG_UART_MCUMGR_RX_BUF_COUNT`` (2) buffers of ``CONFIG_UART_MCUMGR_RX_BUF_SIZE`` (128,
  the ``\\n`` included) from a k_mem_slab; a line longer than that, or one that starts while
  both buffers are held, is ignored up to its ``\\n``. ``smp_uart.c`` frees a buffer from a
  work item once it decoded the line. ``smp.packet.encode(line_length=127)`` makes lines of
  at most 123 bytes. A frame of more lines than free buffers, arriving faster than the device
  decodes them (a USB CDC ACM port, a PTY into an emulator, a CPU stalled by a flash write),
  loses a line and gets no answer.
* ``smp_shell.c`` (``smp_shell_rx_bytes``): the shell transport collects each line in one of
  ``CONFIG_MCUMGR_TRANSPORT_SHELL_RX_BUF_COUNT`` (2) net_bufs and decodes them in the shell
  thread; ``CONFIG_MCUMGR_TRANSPORT_SHELL_MTU`` defaults to 256, below the netbuf size the
  MCUmgr parameters report.
* ``img_mgmt.c`` (``img_mgmt_upload_inspect``): a chunk whose ``off`` is not the offset the
  device expects is dropped and answered *successfully* with the offset it expects; the first
  chunk with the ``sha`` of an upload in progress is answered with its offset (resume); the
  first chunk must hold the 32-byte image header.

So the protocol is go-back-N driven by the device's ``off``: an answer whose ``off`` is not
the end of its chunk means "I expect this offset" (a lost or reordered request ahead of it):
rewind there at once (a fast retransmit, no timeout needed). A lost *answer* costs nothing
when a later answer arrives (offsets are cumulative). Only when nothing comes back does the
retransmission timer fire. A chunk that timed out stays answerable: if its answer comes after
all, the timeout was spurious (a slow device, a busy emulator): its round trip feeds the
estimator and the loss is not held against the packet size or the window.

Packet size and window follow ``tuning.py``: the first chunk is sent alone (the device may
erase the slot first) at the planned size and, while unanswered, re-sent at growing intervals
one rung smaller each time; the attempt that is answered (sequence numbers tell which) sets
the size. Afterwards the window grows while the device keeps up and drops back on the first
loss above what is known to fit; on serial links a size that keeps losing frames steps down.
What worked is written to the device's ``TuningStore`` (the journal) at the end.

Retransmission timeout: the time a chunk takes to leave the gateway (everything queued ahead
of it on a link whose rate is known, e.g. 115200-baud UART: ~0.3 s per 2.4 KiB chunk, W of
them queued) is modelled explicitly; what remains (latency both ways, device processing and
flash writes, answer) is estimated with Jacobson/Karels (RFC 6298: srtt + 4 rttvar, minimum
0.2 s, 1 s until the first chunk's round trip is measured, doubled on every timeout); a
spurious timeout (the answer came after all) raises that minimum to 1.5x the round trip that
fooled it, for the rest of the upload. The timer is also restarted by every answer that makes
progress, so a slow but moving link never times out. Sequence numbers make every RTT sample
unambiguous (Karn's problem does not arise: a retransmission is a new request).

CPU: chunk requests are encoded by hand (below) instead of building a pydantic
``ImageUploadWrite`` per chunk, and answers are read with one ``cbor2.loads`` instead of the
response model. Measured on this machine (2 KB chunks, Python 3.11): model construction +
``.BYTES`` 15.6 us vs 1.4 us by hand; response model 20.7 us vs 0.9 us for ``cbor2.loads``,
i.e. ~34 us less per chunk, ~6 ms per 256 KiB image and per device. The model is still used
for the first chunk (with ``image``/``len``/``sha``); tests/test_upload_window.py checks the
hand encoding byte for byte against the model. The image is sliced through a memoryview (one
copy per chunk, into the packet); nothing is re-encoded or re-hashed per chunk.

Bounds (the device is input from outside: a device that answers but never moves must end the
upload, not hold its lock and a ``max_concurrent`` slot forever)::

    what                        bound                                          on breach
    time, whole upload          ``deadline_s``: ``upload_deadline_s(size, ..)`` UploadError
                                = first_timeout_s + DEADLINE_BASE_S + size /
                                  min_rate_bps (Timeouts.upload_min_rate_bps,
                                  restarts and the first chunk included)
    time, first chunk           ``first_timeout_s`` (re-sent at doubling       SMPTimeout
                                intervals, one rung smaller each time)
    no-progress events in a row ``max_stalls`` (8; timeouts alone: +4, a lossy UploadError
                                link's run of lost round trips, as TCP retries): timeouts,
                                ENOMEM answers, rewinds, answers that do not
                                advance the highest acknowledged offset; each
                                backs off (timer doubles; answers: a pause of
                                NO_PROGRESS_PAUSE_S doubling, at most 1 s).
                                Only a new highest offset resets the count
    requests per no-progress    window (<= MAX_WINDOW) per event, so at most
      stretch                   (max_stalls + 1) * window between two advances
    bytes sent                  MAX_SEND_FACTOR * size + 1 MiB                 UploadError
    device restarts (off -> 0)  ``max_restarts`` (2)                           UploadError
    timed-out requests kept     MAX_GHOSTS (16)
    garbled answers in a row    ``max_stalls``                                 UploadError

The engine adds the per-attempt bound (``Timeouts.attempt_s``) around the whole update.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import cbor2
from smp import error as smperr
from smpclient.requests.image_management import ImageUploadWrite

from gateway.smp.codec import cbor_head
from gateway.smp.errors import SMPError, SMPProtocolError, SMPTimeout, UploadError
from gateway.smp.transport import Transport, TransportError
from gateway.smp.tuning import (
    DATA_LOSS,
    MAX_WINDOW,
    SMP_HEADER,
    ChunkControl,
    LinkFacts,
    LinkMemory,
    ParamsLike,
    Plan,
    TuningStore,
    WindowControl,
    _cbor_extra,
    chunk_data_room,
    first_chunk_floor_for,
    first_resend_s,
    learn,
    plan_upload,
    rto_floor_s,
    same_knowledge,
)

__all__ = ["MAX_WINDOW", "UploadError", "UploadStats", "WindowedUpload", "chunk_data_room",
           "encode_chunk", "upload_plan"]

log = logging.getLogger(__name__)

_HDR = struct.Struct("!BBHHBB")
_OP_WRITE_V2 = 2 | (1 << 3)  # SMP v2 write (what smpclient sends)
_OP_WRITE_RSP = 3
_GROUP_IMAGE = 1
_CMD_UPLOAD = 1

MIN_RTO_S = 0.2
INITIAL_RTO_S = 1.0
MAX_GHOSTS = 16  # timed-out chunks kept answerable (spurious-timeout detection)
DEADLINE_BASE_S = 10.0  # fixed part of an upload's deadline, on top of the first chunk's
DEFAULT_MIN_RATE_BPS = 256.0  # floor rate an upload must beat when none is configured
MAX_SEND_FACTOR = 8  # data bytes sent (retransmissions included) per image byte, at most
NO_PROGRESS_PAUSE_S = 0.01  # first pause after an answer that makes no progress (doubles)
# a timeout may be plain loss (20 % each way loses a round trip in 3 of 8): a run of timeouts
# gets these extra tries over ``max_stalls``; a device's own no-progress answer does not
TIMEOUT_EXTRA_STALLS = 4


def upload_deadline_s(size: int, *, first_timeout_s: float = 30.0,
                      min_rate_bps: float = DEFAULT_MIN_RATE_BPS) -> float:
    """The time an upload of ``size`` bytes may take at most: the first chunk's budget (the
    device may erase the slot), a fixed allowance, and the image at the floor rate."""
    return first_timeout_s + DEADLINE_BASE_S + size / max(min_rate_bps, 1.0)


class SessionLike(Protocol):
    """What the upload uses of ``gateway.smp.session.SMPSession`` (no import: no cycle)."""

    transport: Transport
    device_id: str
    timeout_s: float
    srtt: float | None
    _pending: dict[int, asyncio.Future[bytes]]
    _dead: BaseException | None

    @property
    def params(self) -> Any: ...

    async def mcumgr_params(self, timeout_s: float | None = None) -> Any: ...

    def _next_seq(self) -> int: ...

    def _submit(self, factory: Callable[[int], Any]) -> tuple[Any, asyncio.Future[bytes]]: ...

    def _decode(self, req: Any, frame: bytes, *, raw: bool = False) -> Any: ...


@dataclass
class UploadStats:
    total: int
    start_offset: int = 0
    sent_bytes: int = 0  # data bytes sent, retransmissions included
    chunks: int = 0
    retransmits: int = 0  # retransmission timer expiries
    rewinds: int = 0  # answers "I expect another offset" (fast retransmits)
    window: int = 1  # window at the start
    chunk_size: int = 0  # largest data bytes in one chunk
    seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)
    restarts: int = 0  # the device lost the upload state (rebooted): started again at 0
    link_bytes: int = 0  # bytes put on the link (framing included), all requests of the upload
    rto_s: float = 0.0  # final residual RTO (diagnostics)
    packet: int = 0  # SMP packet limit at the end
    window_final: int = 1
    window_max: int = 1
    spurious: int = 0  # timeouts whose answer came after all
    gaps: int = 0  # answers that came while an earlier request never got one (silently lost)
    probes: list[int] = field(default_factory=list)  # first-chunk sizes that got no answer
    plan: str = ""  # Plan.describe() of the start

    @property
    def retransmitted_bytes(self) -> int:
        return max(0, self.sent_bytes - (self.total - self.start_offset))

    @property
    def retransmitted_ratio(self) -> float:
        need = self.total - self.start_offset
        return self.retransmitted_bytes / need if need > 0 else 0.0


# -- CBOR by hand --------------------------------------------------------------------------
_KEY_OFF = b"\x63off"
_KEY_DATA = b"\x64data"


def encode_chunk(seq: int, off: int, data: bytes | memoryview) -> bytes:
    """The SMP v2 packet of a continuation chunk; byte-identical to smpclient's
    ``ImageUploadWrite(off=off, data=data, sequence=seq).BYTES`` (keys in the same order)."""
    body = b"".join((b"\xa2", _KEY_OFF, cbor_head(0, off), _KEY_DATA, cbor_head(2, len(data))))
    hdr = _HDR.pack(_OP_WRITE_V2, 0, len(body) + len(data), _GROUP_IMAGE, seq, _CMD_UPLOAD)
    return b"".join((hdr, body, data))


def first_chunk_overhead(total: int, image_num: int) -> int:
    """Bytes of the first chunk's request (``image``/``len``/``off``/``sha``) with empty data."""
    return len(ImageUploadWrite(off=0, data=b"", image=image_num, len=total, sha=b"\0" * 32,
                                sequence=0).BYTES)


async def upload_plan(session: SessionLike, *, image_size: int = 1 << 20, image_num: int = 0,
                      window: int | None = None, chunk_cap: int | None = None,
                      store: TuningStore | None = None) -> Plan:
    """The packet size and window an upload on ``session`` would start with, and why.

    Reads the MCUmgr parameters (once per session) and the device's remembered tuning."""
    params: ParamsLike = await session.mcumgr_params()
    memory = LinkMemory.from_dict(store.link_tuning(session.device_id)) if store else None
    floor = first_chunk_floor_for(first_chunk_overhead(image_size, image_num))
    return plan_upload(LinkFacts.of(session.transport), params, memory, floor=floor,
                       now=time.time(), window_override=window, chunk_cap=chunk_cap)


_logged: dict[str, str] = {}  # device id -> the last plan logged (log once per device)


@dataclass(eq=False)
class _Chunk:
    seq: int
    off: int
    end: int
    order: int  # send order within the attempt
    fut: asyncio.Future[bytes]
    at_device: float  # estimated time its last byte left the gateway's link
    due: float  # retransmission deadline
    stale: bool = False  # sent before a rewind: its answer updates the offset, nothing else
    live_timeout: bool = False  # timed out while it counted (a late answer = spurious timeout)
    ghosted_at: float = 0.0  # when it timed out


class WindowedUpload:
    """One upload over one session. ``await WindowedUpload(...).run()`` -> UploadStats."""

    def __init__(
        self,
        session: SessionLike,
        image: bytes,
        *,
        image_num: int = 0,
        window: int | None = None,
        chunk_cap: int | None = None,
        first_timeout_s: float = 30.0,
        progress: Callable[[int, int], None] | None = None,
        max_stalls: int = 8,
        max_restarts: int = 2,
        store: TuningStore | None = None,
        fixed: bool = False,
        deadline_s: float | None = None,
    ) -> None:
        self.s = session
        self.fixed = fixed  # no discovery, nothing learned: benchmark sweeps
        self.image = image
        self.view = memoryview(image)
        self.image_num = image_num
        self.window_cfg = window
        self.chunk_cap = chunk_cap
        self.first_timeout_s = first_timeout_s
        self.progress = progress
        self.max_stalls = max_stalls
        self.max_restarts = max_restarts
        self.store = store
        self.total = len(image)
        self.deadline_s = (deadline_s if deadline_s is not None
                           else upload_deadline_s(self.total, first_timeout_s=first_timeout_s))
        self.sha = hashlib.sha256(image).digest()
        self.stats = UploadStats(total=self.total)
        tr = session.transport
        rate = getattr(tr, "link_rate", None)
        self.rate: float | None = float(rate) if rate else None  # bytes/s, None = unknown
        self.timeout_cap = max(session.timeout_s, 0.5)
        # residual RTT estimator (RFC 6298), seeded from the session's small requests
        r0 = session.srtt if session.srtt is not None else 0.1
        self.srtt = r0
        self.rttvar = r0 / 2
        self.backoff = 1.0
        # raised by spurious timeouts: a device (or emulator) whose answers sometimes take
        # much longer than usual would otherwise be timed out again and again, each time
        # costing a chunk on the link; the estimator alone forgets a rare long delay in a few
        # samples (Eifel/F-RTO keep a similar memory of spurious timeouts)
        self.rto_floor = MIN_RTO_S
        # the session's small requests seed srtt, but a chunk also costs a flash write: until
        # one chunk's round trip is measured the RTO is RFC 6298's initial 1 s
        self.sampled = False
        self._last_progress = (0, 0.0)
        self._acked = 0  # the device's acknowledged offset (for the deadline's message)
        self.plan: Plan | None = None
        self.memory: LinkMemory | None = None
        self.chunks: ChunkControl | None = None
        self.win: WindowControl | None = None
        self._first_s: float | None = None  # answer time of a first chunk that started afresh
        self._settled: int | None = None  # packet size the first chunk's answer settled

    # -- sizes -------------------------------------------------------------------------
    def packet_limit(self) -> int:
        """The packet size an upload would start with from the session's parameters alone
        (no remembered tuning; kept for callers of the old API: ``upload_plan`` says more)."""
        floor = first_chunk_floor_for(first_chunk_overhead(self.total, self.image_num))
        return plan_upload(LinkFacts.of(self.s.transport), self.s.params, None, floor=floor,
                           now=time.time(), window_override=self.window_cfg,
                           chunk_cap=self.chunk_cap).packet

    @property
    def limit(self) -> int:
        """The SMP packet limit in use (tuning's current size)."""
        assert self.chunks is not None
        return self.chunks.packet

    def _data_len(self, off: int, limit: int) -> int:
        n = min(chunk_data_room(limit, off), self.total - off)
        if self.chunk_cap is not None:
            n = min(n, self.chunk_cap)
        return n

    def _first_request(self, limit: int, seq: int) -> ImageUploadWrite:
        base = first_chunk_overhead(self.total, self.image_num)  # incl. the empty bstr head
        n = limit - base
        while n > 0 and base + _cbor_extra(n) + n > limit:
            n -= 1
        n = min(n, self.total)
        if self.chunk_cap is not None:
            n = min(n, self.chunk_cap)
        if n < 32 and self.total >= 32:  # img_mgmt needs the 32-byte image header in chunk 0
            raise UploadError(f"a {limit}-byte packet cannot carry the image header in the first "
                              "chunk (device buffer too small)")
        return ImageUploadWrite(off=0, data=self.image[:n], image=self.image_num, len=self.total,
                                sha=self.sha, sequence=seq)

    # -- RTO ---------------------------------------------------------------------------
    def rto(self) -> float:
        base = max(self.rto_floor, self.srtt + 4 * self.rttvar)
        if not self.sampled:  # RFC 6298 2.1: 1 s until a chunk's round trip was measured
            base = max(base, INITIAL_RTO_S)
        return min(base * self.backoff, max(self.timeout_cap, MIN_RTO_S))

    def _sample(self, residual: float) -> None:
        self.sampled = True
        residual = max(residual, 0.0)
        err = residual - self.srtt
        self.srtt += err / 8
        self.rttvar += (abs(err) - self.rttvar) / 4

    # -- progress ----------------------------------------------------------------------
    def _report(self, acked: int, force: bool = False) -> None:
        self._acked = acked
        if self.progress is None:
            return
        last_off, last_t = self._last_progress
        now = time.monotonic()
        # at most ~64 calls per upload, and at least every 0.5 s while moving
        if force or acked >= self.total or acked - last_off >= self.total / 64 or now - last_t >= 0.5:
            self._last_progress = (acked, now)
            self.progress(acked, self.total)

    def _note(self, change: str | None, where: int) -> None:
        if change:
            self.stats.fallbacks.append(f"{change} at {where}")
            log.info("device=%s upload: %s at %d/%d", self.s.device_id, change, where, self.total)

    # -- the upload --------------------------------------------------------------------
    async def run(self) -> UploadStats:
        s = self.s
        params: ParamsLike = await s.mcumgr_params()
        stored = self.store.link_tuning(s.device_id) if self.store is not None else None
        self.memory = LinkMemory.from_dict(stored)
        floor = first_chunk_floor_for(first_chunk_overhead(self.total, self.image_num))
        plan = self.plan = plan_upload(
            LinkFacts.of(s.transport), params, self.memory, floor=floor, now=time.time(),
            window_override=self.window_cfg, chunk_cap=self.chunk_cap, fixed=self.fixed)
        desc = plan.describe()
        if _logged.get(s.device_id) != desc:
            _logged[s.device_id] = desc
            log.info("device=%s upload tuning %s", s.device_id, desc)
        self.stats.plan = desc
        self.chunks = ChunkControl(plan.ladder, step_on_loss=plan.facts.serial and not self.fixed)
        self.win = WindowControl(plan.window, cap=plan.window_cap, trusted=plan.trusted_window,
                                 grow_limit=plan.grow_limit, static=self.fixed)
        self.stats.window = plan.window
        # the link's own floor (BLE connection events, a UART's wire time): see tuning.rto_floor_s
        self.rto_floor = max(self.rto_floor, rto_floor_s(plan.facts, plan.packet))
        if not params.reported and self.window_cfg is None:
            self.stats.fallbacks.append(f"no MCUmgr parameters: window {plan.window}")
        t0 = time.monotonic()
        bytes0 = s.transport.bytes_sent
        try:
            async with asyncio.timeout(self.deadline_s) as bound:
                last_match = await self._attempts()
        except TimeoutError:
            if not bound.expired():
                raise
            self._remember_first_chunk()
            raise UploadError(
                f"upload not finished within {self.deadline_s:.0f}s (a {self.total}-byte image "
                f"at the configured floor rate; {self.stats.chunks} requests sent, the device "
                f"acknowledged {self._acked}/{self.total}): given up") from None
        self.stats.seconds = time.monotonic() - t0
        self.stats.link_bytes = s.transport.bytes_sent - bytes0
        self.stats.rto_s = self.rto()
        assert self.chunks is not None and self.win is not None
        self.stats.packet = self.chunks.packet
        self.stats.window_final = self.win.window
        self.stats.window_max = self.win.max_window
        if last_match is False:
            raise UploadError("device reports that the uploaded image does not match its sha256")
        if not self.fixed:
            self._remember()
        return self.stats

    async def _attempts(self) -> bool | None:
        s = self.s
        restarts = 0
        while True:
            try:
                last_match = await self._attempt()
                break
            except _DeviceRestarted as exc:
                restarts += 1
                self.stats.restarts = restarts
                if restarts > self.max_restarts:
                    raise UploadError(f"device lost the upload state {restarts} times ({exc})") from None
                log.warning("device=%s upload: %s; starting again", s.device_id, exc)
            except Exception:
                # the link failed or the device refused: keep what the first chunk taught (the
                # engine re-opens the link and resumes without probing again), nothing else
                # (losses from an outage say nothing about the device)
                self._remember_first_chunk()
                raise
        return last_match

    def _remember_first_chunk(self) -> None:
        plan, chunks = self.plan, self.chunks
        if (self.store is None or self.fixed or plan is None or chunks is None
                or not plan.reprobe or self._settled is None):
            return
        mem = LinkMemory(packet=self._settled, window=min(plan.window, plan.trusted_window),
                         packet_failed=chunks.failed, params=plan.params,
                         link=plan.facts.signature, probed_at=time.time(), updated_at=time.time())
        try:
            self.store.put_link_tuning(self.s.device_id, mem.to_dict())
        except Exception as exc:
            log.warning("device=%s could not store link tuning: %s", self.s.device_id, exc)

    def _remember(self) -> None:
        assert self.plan is not None and self.chunks is not None and self.win is not None
        per_kb = self._first_s / (self.total / 1024) if self._first_s and self.total else None
        new = learn(self.plan, self.chunks, self.win, self.memory, now=time.time(),
                    first_s_per_kb=per_kb)
        if not same_knowledge(self.memory, new):
            log.info("device=%s upload tuning learned packet=%d window=%d%s%s",
                     self.s.device_id, new.packet, new.window,
                     f" packet_failed={new.packet_failed}" if new.packet_failed else "",
                     f" window_failed={new.window_failed}" if new.window_failed else "")
        if self.store is not None:
            try:
                self.store.put_link_tuning(self.s.device_id, new.to_dict())
            except Exception as exc:  # the upload succeeded; tuning is an optimisation
                log.warning("device=%s could not store link tuning: %s", self.s.device_id, exc)
        self.memory = new

    async def _first_chunk(self) -> tuple[int, int, bool | None, list[tuple[int, asyncio.Future[bytes]]]]:
        """Send chunk 0 (``image``/``len``/``sha``) alone: (device offset, data bytes, match,
        attempts sent after the answered one that are still unanswered).

        The device may erase the slot before it answers (seconds on real flash), so the
        budget is ``first_timeout_s``; but a lost request must not cost all of it: the request
        is re-sent at growing intervals (1 s, or 1.5x the erase time remembered for this
        device, then doubling, plus the time to send it), one rung down the size ladder each
        time, every attempt stays answerable, and the first answer wins. Re-sending is
        harmless: the same ``sha`` makes the device answer the offset it holds (resume), never
        re-erase. The answered attempt's size is the size that works; attempts sent after it
        may still be queued in the device (holding a buffer): the caller counts them in flight.
        """
        s = self.s
        chunks = self.chunks
        assert chunks is not None
        loop = asyncio.get_running_loop()
        t_end = loop.time() + self.first_timeout_s
        futs: dict[asyncio.Future[bytes], tuple[int, ImageUploadWrite, int, float]] = {}
        waiting: set[asyncio.Future[bytes]] = set()
        sizes: list[int] = []  # attempt sizes in send order
        keep: list[tuple[int, asyncio.Future[bytes]]] = []
        interval = max(first_resend_s(self.memory, self.total), 4 * self.srtt)
        try:
            while True:
                limit = chunks.packet
                req, fut = s._submit(functools.partial(self._first_request, limit))
                futs[fut] = (req.header.sequence, req, limit, loop.time())
                waiting.add(fut)
                sizes.append(limit)
                before = s.transport.bytes_sent
                await s.transport.send(req.BYTES)
                wait = interval
                if self.rate:
                    wait += (s.transport.bytes_sent - before) / self.rate
                wait = min(wait, max(0.0, t_end - loop.time()))
                done, _ = await asyncio.wait(waiting, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                # the device answers in order: take the earliest attempt that was answered
                for f in sorted(done, key=lambda x: list(futs).index(x)):
                    waiting.discard(f)
                    if f.cancelled():
                        continue
                    exc = f.exception()
                    if exc is not None:
                        raise exc
                    q, sent_req, size, t_sent = futs[f]
                    try:
                        rsp = s._decode(sent_req, f.result())
                    except SMPProtocolError as exc:  # garbled answer: as if lost
                        log.warning("device=%s upload: unusable answer to the first chunk (%s)",
                                    s.device_id, exc)
                        continue
                    if rsp.off is None:
                        raise UploadError("device answered the first chunk without an offset")
                    off = rsp.off
                    if not isinstance(off, int) or isinstance(off, bool) or not 0 <= off <= self.total:
                        # (b) taken only when it is an offset into this image: a negative one
                        # would slice the image from its tail
                        raise UploadError(f"device answered the first chunk with offset {off!r}, "
                                          f"not one within the image's {self.total} bytes")
                    order = list(futs)
                    earlier = order.index(f)
                    unanswered = [futs[g][2] for g in order[:earlier]
                                  if not g.done() or g.cancelled()]
                    self.stats.probes = sorted({x for x in unanswered if x > size}, reverse=True)
                    chunks.settle(size, unanswered)
                    self._settled = chunks.packet
                    if rsp.off == len(sent_req.data):  # a fresh upload: the device erased first
                        self._first_s = loop.time() - t_sent
                    keep = [(futs[g][0], g) for g in order[earlier + 1:] if not g.done()]
                    return int(rsp.off), len(sent_req.data), rsp.match, keep
                if loop.time() >= t_end:
                    tried = ", ".join(str(x) for x in sorted(set(sizes), reverse=True))
                    raise SMPTimeout(f"{s.device_id}: no answer to the first upload chunk "
                                     f"within {self.first_timeout_s:g}s (packets of {tried} bytes)")
                self.stats.retransmits += 1
                smaller = chunks.step_down()
                if smaller is not None:
                    log.info("device=%s upload: no answer yet to a %d-byte first chunk "
                             "(erasing, or lost); trying %d", s.device_id, limit, smaller)
                interval *= 2
        finally:
            kept = {g for _, g in keep}
            for f, (q, _, _, _) in futs.items():
                if f in kept:
                    continue
                if s._pending.get(q) is f:
                    del s._pending[q]
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()  # retrieved: a link failure is raised once, not logged per chunk

    async def _attempt(self) -> bool | None:
        s = self.s
        stats = self.stats
        total = self.total
        chunks, win = self.chunks, self.win
        assert chunks is not None and win is not None

        acked, first_len, last_match, leftovers = await self._first_chunk()
        if acked > total:
            raise UploadError(f"device reports offset {acked} beyond the image size {total}")
        # the device answers the offset it already holds for this sha (resume) without writing
        stats.start_offset = 0 if acked == first_len else acked
        stats.sent_bytes += first_len
        stats.chunks += 1
        stats.chunk_size = max(stats.chunk_size, first_len)
        self._report(acked, force=True)
        if acked >= total:
            return last_match

        loop = asyncio.get_running_loop()
        transport = s.transport
        pending = s._pending
        inflight: dict[int, _Chunk] = {}  # seq -> chunk, in send order
        ghosts: dict[int, _Chunk] = {}  # timed out, still answerable (spurious timeouts)
        arrived: deque[tuple[int, asyncio.Future[bytes]]] = deque()
        wake = asyncio.Event()
        timer: asyncio.TimerHandle | None = None
        timer_at = 0.0
        fired = False
        next_off = acked
        acked_order = -1  # send order of the chunk whose answer set ``acked``
        order = 0
        stalls = 0
        high = acked  # the highest offset the device acknowledged: only passing it is progress
        pause = False  # an answer made no progress: back off before sending again
        max_sent = MAX_SEND_FACTOR * total + (1 << 20)
        tx_free = 0.0  # modelled time at which our side of the link is idle
        last_ack = loop.time()
        # the last timeout's go-back (send order then, chunks it marked stale, next_off then)
        undo: tuple[int, set[int], int] | None = None

        def on_done(seq: int, fut: asyncio.Future[bytes]) -> None:
            arrived.append((seq, fut))
            wake.set()

        # first-chunk attempts the device may still hold: in flight (stale) until answered
        now0 = loop.time()
        for i, (q, f) in enumerate(leftovers):
            inflight[q] = _Chunk(q, 0, first_len, i - len(leftovers), f, now0, now0 + self.rto(),
                                 stale=True)
            f.add_done_callback(functools.partial(on_done, q))

        def fire() -> None:
            nonlocal fired
            fired = True
            wake.set()

        def ghost(ch: _Chunk) -> None:
            """Stop waiting for ``ch`` but keep its answer welcome (spurious-timeout check) and
            count it against the device's buffers until a later chunk's answer settles it."""
            if inflight.get(ch.seq) is ch:
                del inflight[ch.seq]
            if ch.fut.done():
                self._forget(ch, inflight)
                return
            ch.live_timeout = not ch.stale
            ch.ghosted_at = loop.time()
            ghosts[ch.seq] = ch
            while len(ghosts) > MAX_GHOSTS:
                old = ghosts.pop(next(iter(ghosts)))
                self._forget(old, inflight)

        def stall() -> None:
            """A retransmission without progress: back off; too many in a row end the upload."""
            nonlocal stalls
            stalls += 1
            stats.retransmits += 1
            self.backoff = min(self.backoff * 2, 64.0)
            if stalls > self.max_stalls + TIMEOUT_EXTRA_STALLS:
                raise UploadError(f"no progress after {stalls - 1} retransmissions at "
                                  f"offset {acked}/{total}")

        def no_progress(what: str) -> None:
            """An answer that does not move the device past ``high`` (ENOMEM, a rewind, an
            offset it already acknowledged): a stall like a timeout, and a pause before the
            next request (a hostile or broken device must not get a request per answer)."""
            nonlocal stalls, pause
            stalls += 1
            pause = True
            if stalls > self.max_stalls:
                raise UploadError(f"no progress after {stalls} stalls in a row at offset "
                                  f"{acked}/{total} (the last: {what}); given up")

        def lost(kind: str, where: int) -> None:
            """A loss: the window takes the blame when it is probing or above 1 (any lost
            data there steps it down: tuning.DATA_LOSS), else the packet size."""
            blame_window = win.probing or (kind in DATA_LOSS and win.window > 1)
            self._note(win.on_loss(kind), where)
            if not blame_window and kind != "enomem":
                self._note(chunks.on_chunk(False), where)

        try:
            while acked < total:
                # 1. fill the window (stale chunks still hold device buffers: they count, and
                # so do timed-out ones the device may still queue, until an answer to a later
                # chunk settles them: never more requests at the device than its capacity, or
                # Zephyr's netbuf pool runs dry; on Renode a device driven past that by a fixed
                # window of 3 once stopped answering until it was reset)
                next_off = max(next_off, acked)
                room = win.cap - len(ghosts)
                hold_until = 0.0
                if room <= 0:
                    # as many timed-out requests as the device holds: wait (one backed-off
                    # RTO) for an answer before sending another (they may all be lost)
                    hold_until = max(g.ghosted_at for g in ghosts.values()) + self.rto()
                    room = 1 if loop.time() >= hold_until else 0
                w = min(win.window, room)
                limit = chunks.packet
                while len(inflight) < w and next_off < total:
                    if s._dead is not None:
                        raise TransportError(f"link to {s.device_id} is down: {s._dead}")
                    if stats.sent_bytes > max_sent:
                        raise UploadError(f"sent {stats.sent_bytes} bytes for a {total}-byte "
                                          f"image and the device holds {acked}: given up")
                    n = self._data_len(next_off, limit)
                    if n <= 0:
                        raise UploadError(f"device buffer of {limit} bytes cannot carry image data")
                    seq = s._next_seq()
                    pkt = encode_chunk(seq, next_off, self.view[next_off : next_off + n])
                    fut: asyncio.Future[bytes] = loop.create_future()
                    pending[seq] = fut
                    fut.add_done_callback(functools.partial(on_done, seq))
                    before = transport.bytes_sent
                    now = loop.time()
                    await transport.send(pkt)
                    if self.rate:
                        tx_free = max(tx_free, now) + (transport.bytes_sent - before) / self.rate
                        at_dev = tx_free
                    else:
                        at_dev = loop.time()
                    inflight[seq] = _Chunk(seq, next_off, next_off + n, order, fut, at_dev,
                                           at_dev + self.rto())
                    order += 1
                    stats.chunk_size = max(stats.chunk_size, n)
                    stats.sent_bytes += n
                    stats.chunks += 1
                    next_off += n
                if not inflight and not ghosts:
                    raise UploadError(f"nothing in flight at offset {acked}/{total}")

                # 2. wait for an answer or the retransmission deadline of the oldest chunk
                # (or, with only timed-out requests out, the end of the hold above)
                oldest = next(iter(inflight.values()), None)
                if not arrived:
                    if oldest is None:
                        deadline = hold_until
                    else:
                        deadline = max(oldest.due, last_ack + self.rto())
                    if timer is None or fired or timer_at != deadline:
                        if timer is not None:
                            timer.cancel()
                        fired = False
                        timer_at = deadline
                        timer = loop.call_at(deadline, fire)
                    wake.clear()
                    await wake.wait()
                    if not arrived and fired:
                        # let answers already read from the socket reach us before giving up
                        for _ in range(3):
                            await asyncio.sleep(0)
                if not arrived:
                    if not fired:
                        continue
                    timer = None
                    if oldest is None:
                        if next_off < total:
                            continue  # the hold is over: one request may go
                        # the hold is over and everything past ``acked`` went out already and
                        # timed out (a device reset forgets them all): a stall, and the next
                        # request goes again from the acknowledged offset
                        stall()
                        next_off = acked
                        continue
                    was_stale = oldest.stale
                    ghost(oldest)
                    if was_stale:
                        continue  # sent before a rewind and unanswered: no resend for it
                    stall()
                    lost("timeout", acked)
                    log.debug("device=%s upload: timeout at %d/%d (rto %.3fs), going back",
                              s.device_id, acked, total, self.rto())
                    now = loop.time()
                    marked = set()
                    for ch in list(inflight.values()):
                        if ch.due <= now:
                            ghost(ch)
                        elif not ch.stale:
                            ch.stale = True
                            marked.add(ch.seq)
                    # if this timeout turns out spurious, going back is undone (Eifel-like)
                    undo = (order, marked, next_off)
                    next_off = acked
                    continue

                # 3. answers
                while arrived:
                    seq, f = arrived.popleft()
                    got = inflight.get(seq)
                    late = False
                    if got is None or got.fut is not f:
                        g = ghosts.get(seq)
                        if g is None or g.fut is not f:
                            continue
                        # an answer to a chunk we had given up on: the timeout was spurious
                        del ghosts[seq]
                        got, late = g, True
                    if f.cancelled():
                        continue
                    ch = got
                    inflight.pop(seq, None)
                    # the device handles requests in order: whatever was sent before this
                    # chunk and is still unanswered was lost (or its answer was): no longer
                    # held by the device, so it leaves the window now, not at its timeout.
                    # A live one among them is evidence of loss (a silent gap)
                    gap = False
                    for old in [c for c in inflight.values() if c.order < ch.order]:
                        gap = gap or not old.stale
                        self._forget(old, inflight)
                    if not late:  # timed-out chunks sent before it are settled too
                        for g in [g for g in ghosts.values() if g.order < ch.order]:
                            del ghosts[g.seq]
                            self._forget(g, inflight)
                    exc = f.exception()
                    if exc is not None:
                        raise exc
                    try:
                        dev_off, match = self._parse(f.result())
                    except SMPProtocolError as exc:
                        if late:
                            continue
                        # a garbled answer says nothing: treat it as lost, resend from acked
                        log.warning("device=%s upload: unusable answer (%s); going back to %d",
                                    s.device_id, exc, acked)
                        stats.retransmits += 1
                        stalls += 1
                        if stalls > self.max_stalls:
                            raise UploadError(f"{stalls} unusable answers in a row at offset "
                                              f"{acked}/{total}: {exc}") from exc
                        for c in inflight.values():
                            c.stale = True
                        next_off = acked
                        continue
                    except SMPError as err:
                        if err.group is not None or err.rc != smperr.MGMT_ERR.ENOMEM:
                            raise
                        # smp.c: no netbuf was left for the answer, so the request's own buffer
                        # carried {"rc": ENOMEM} back and the chunk was not written: the device
                        # holds too many requests. One chunk less in flight; resend from there.
                        if late:
                            continue
                        lost("enomem", ch.off)
                        if not ch.stale:
                            no_progress(f"ENOMEM at offset {ch.off}")
                            stats.rewinds += 1
                            for c in inflight.values():
                                c.stale = True
                            next_off = min(next_off, ch.off)
                        continue
                    now = loop.time()
                    if late:
                        if ch.live_timeout:
                            stats.spurious += 1
                            residual = now - ch.at_device
                            self._sample(residual)  # the slow round trip that fooled us
                            self.rto_floor = min(max(self.rto_floor, 1.5 * residual),
                                                 max(self.timeout_cap, MIN_RTO_S))
                            win.on_spurious()
                            chunks.on_spurious()
                            if undo is not None:
                                # the chunks the timeout gave up on are still on their way:
                                # count on their answers again; re-sends since are duplicates
                                since, marked, resume = undo
                                for c in inflight.values():
                                    if c.seq in marked:
                                        c.stale = False
                                    elif c.order >= since:
                                        c.stale = True
                                next_off = max(next_off, resume)
                                undo = None
                        ch.stale = True  # its offset counts, nothing else
                    if dev_off > total:
                        raise UploadError(f"device reports offset {dev_off} beyond {total}")
                    if dev_off < acked:
                        if ch.order < acked_order:
                            continue  # an older answer overtaken by a newer one: nothing new
                        if dev_off == 0:
                            # the device rebooted (its RAM upload state is gone) or another
                            # client started an upload: only a first chunk can start again
                            raise _DeviceRestarted(
                                f"device offset went back from {acked} to {dev_off}")
                        # the device holds less than it acknowledged: go back to its offset
                        acked, acked_order = dev_off, ch.order
                        no_progress(f"rewind to {dev_off}")
                        if not ch.stale:
                            lost("rewind", dev_off)
                        stats.rewinds += 1
                        for c in inflight.values():
                            c.stale = True
                        next_off = dev_off
                        continue
                    if match is not None:
                        last_match = match
                    if not ch.stale:
                        self._sample(now - ch.at_device)
                    advanced = dev_off > high
                    if dev_off > acked:
                        acked = dev_off
                        acked_order = max(acked_order, ch.order)
                        last_ack = now
                        if advanced:
                            high = dev_off
                            stalls = 0
                            self.backoff = 1.0
                        self._report(acked)
                        # chunks wholly below the device's offset are done (their answers
                        # may have been lost: offsets are cumulative)
                        for old in [c for c in inflight.values() if c.end <= acked]:
                            self._forget(old, inflight)
                    if not ch.stale:
                        if dev_off != ch.end:
                            # "I expect dev_off": a request ahead of this one was lost or
                            # overtaken; everything in flight is now moot
                            if not advanced:
                                no_progress(f"answer off={dev_off} to the chunk at {ch.off}")
                            stats.rewinds += 1
                            # an offset the device had acknowledged already: a duplicate
                            lost("rewind" if advanced else "duplicate", dev_off)
                            for c in inflight.values():
                                c.stale = True
                            next_off = dev_off
                            undo = None
                        elif gap:
                            # its data arrived (offsets are cumulative) but an answer ahead
                            # of it did not: the device or the link dropped something
                            stats.gaps += 1
                            lost("gap", dev_off)
                        else:
                            self._note(win.on_answer(), dev_off)
                            chunks.on_chunk(True)
                if pause:
                    # back off after answers that made no progress (doubling, at most 1 s);
                    # answers arriving meanwhile wait in ``arrived``
                    pause = False
                    await asyncio.sleep(min(1.0, NO_PROGRESS_PAUSE_S * 2 ** max(0, stalls - 1)))
        finally:
            if timer is not None:
                timer.cancel()
            for q, ch in [*inflight.items(), *ghosts.items()]:
                if pending.get(q) is ch.fut:
                    del pending[q]
                if not ch.fut.done():
                    ch.fut.cancel()
                elif not ch.fut.cancelled():
                    ch.fut.exception()  # retrieved: the link failure is raised once
        return last_match

    def _forget(self, ch: _Chunk, inflight: dict[int, _Chunk]) -> None:
        if inflight.get(ch.seq) is ch:
            del inflight[ch.seq]
        if self.s._pending.get(ch.seq) is ch.fut:
            del self.s._pending[ch.seq]
        if not ch.fut.done():
            ch.fut.cancel()

    def _parse(self, frame: bytes) -> tuple[int, bool | None]:
        """``off`` and ``match`` of an upload answer; SMPError for an error answer."""
        bad = functools.partial(SMPProtocolError, "ImageUploadWrite", None,
                                smperr.MGMT_ERR.EUNKNOWN)

        if len(frame) < SMP_HEADER:
            raise bad("short answer")
        op, _flags, length, group, _seq, cmd = _HDR.unpack_from(frame)
        if (op & 7) != _OP_WRITE_RSP or group != _GROUP_IMAGE or cmd != _CMD_UPLOAD:
            raise bad(f"answer is not an upload response (op {op & 7} group {group} cmd {cmd})")
        if len(frame) - SMP_HEADER < length:
            raise bad(f"truncated: header announces {length} bytes, {len(frame) - SMP_HEADER} present")
        try:
            body: Any = cbor2.loads(frame[SMP_HEADER : SMP_HEADER + length])
        except Exception as exc:
            raise bad(f"bad CBOR: {exc}") from exc
        if not isinstance(body, dict):
            raise bad("answer is not a map")
        err = body.get("err")
        if isinstance(err, dict) and err.get("rc", 0) != 0:
            if not isinstance(err.get("rc"), int) or not isinstance(err.get("group", -1), int):
                raise bad(f"malformed err field: {err!r}")
            raise SMPError("ImageUploadWrite", int(err.get("group", -1)), int(err["rc"]))
        rc = body.get("rc")
        if isinstance(rc, int) and rc != 0:
            rsn = body.get("rsn")
            raise SMPError("ImageUploadWrite", None, rc, rsn if isinstance(rsn, str) else None)
        off = body.get("off")
        if not isinstance(off, int) or isinstance(off, bool) or off < 0:
            raise bad(f"answer without a valid offset: {body!r}")
        match = body.get("match")
        return off, match if isinstance(match, bool) else None


class _DeviceRestarted(Exception):
    pass
