"""Upload tuning policy: the packet size and window an upload starts with, and how they move.

Owns the *decisions* of a link-aware upload, as pure functions and small state machines (no
I/O, no clock: the caller passes ``now``); ``upload.py`` owns the mechanics and asks here.

What is known before the first byte (each read in the sources, not guessed):

* MCUmgr parameters, when the firmware reports them (``CONFIG_MCUMGR_GRP_OS_MCUMGR_PARAMS``):
  ``buf_size``/``buf_count`` of the SMP netbuf pool (Zephyr ``smp.c``). A request must fit a
  netbuf; at most ``buf_count - 1`` requests can be held (the last buffer carries an answer).
  The stock sample does not report them (ENOTSUP); then the Kconfig defaults are the best
  guess (``subsys/mgmt/mcumgr/transport/Kconfig``: 384 x 4, and 2048 x 2 with the UDP
  transport).
* The link: a UDP datagram must fit the MTU minus IP/UDP headers (``smpclient``'s UDP
  transport sends MTU - 28 = 1472, and so does the gateway); over serial ``serial_util.c``
  (``mcumgr_serial_process_frag``) decodes the 2-byte frame length, the packet and the CRC16
  into one netbuf, so a serial packet is at most ``buf_size - 4``.
* Serial framing: base64 lines of at most ``line_length`` (``smp.packet.encode``) into the
  device's line buffers: ``uart_mcumgr.c`` keeps ``CONFIG_UART_MCUMGR_RX_BUF_COUNT`` (2) lines
  of ``CONFIG_UART_MCUMGR_RX_BUF_SIZE`` (128) bytes and *drops* a line that starts while both
  are held; ``smp_shell.c`` has ``CONFIG_MCUMGR_TRANSPORT_SHELL_RX_BUF_COUNT`` (2) line bufs
  and ``CONFIG_MCUMGR_TRANSPORT_SHELL_MTU`` (256). So a frame of more than two lines, or a
  frame sent while the device still holds the previous one, may lose a line on a device
  whose parameters say 384 x 4. That is not reported anywhere: it is discovered.

What is discovered, and the rules (one place, so the tests and ``smp-gateway probe`` see
the same thing):

* **Packet size.** Start at the largest size the known facts allow (above). A first chunk
  that gets no answer is sent again one rung smaller (``ladder``: serial halves the number of
  lines down to 2 lines, the line-buffer default that smpclient/smpmgr also use (128 x 2
  encoded bytes); datagram links halve the size, snapping to the Kconfig netbuf default 384 on
  the way), never below the floor that still carries the 32-byte MCUboot image header in the
  first chunk (``img_mgmt.c`` needs it to check the image). Every attempt stays answerable and
  the device handles requests in order, so the attempt that gets answered names a size that
  works (an erase that takes seconds does not count as a failure). On serial links, where
  drops depend on the lines per frame and on timing, a size that loses ``LOSS_LIMIT`` of its
  last ``LOSS_SPAN`` chunks also steps down mid-upload (losses the window already took the
  blame for do not count). Datagram links drop a too-large packet every time, so the first
  chunk settles their size.
* **Window.** Where the device's reported capacity is the only buffer (UDP/BLE with MCUmgr
  parameters) the upload starts at ``buf_count - 1`` and treats a loss as a link loss
  (go-back-N; two timeouts in a row fall back to 1). **Any evidence that data was lost at a
  window above 1 takes one off and marks that window as failed**: ENOMEM, a rewind (an answer
  with an offset below the chunk's end: a request ahead of it was dropped), a duplicate offset
  (an answer that does not move the device on), a silent gap (a later chunk answered while an
  earlier one never was). The reported capacity is not proof: Zephyr's BLE transport
  (``smp_bt.c``) reports ``buf_count`` 4, but reassembly holds one netbuf and each request in
  flight needs one for its answer; with none free the write without response is dropped
  silently, and the device's only trace is the earlier offset in its next answer. Everywhere else
  (serial links: the line buffers are not in the parameters; any link without parameters) it
  starts at 1, or at the window remembered for the device, and **grows by one only after
  ``GROW_AFTER`` x W answers in a row that kept up** (each answer advanced the offset by its
  own chunk: nothing lost, nothing re-sent), never above the reported capacity
  (``buf_count - 1``; 3, the Kconfig default, when unknown). **The first loss at a window
  above what is known to fit drops it back by one and stops the growth** for the rest of the
  upload; that window is remembered as too big. A window that lost data (or timed out, the
  timeout not found spurious) is never stored as the one that kept up.
* **Serial shell** (``smp_shell.c``, ``SerialTransport(shell=True)``): the shell's MTU
  (``CONFIG_MCUMGR_TRANSPORT_SHELL_MTU``, 256) and its 2 line buffers of 127 bytes bound a
  request below the netbuf the parameters report: uploads start at the largest packet within
  both (2 lines at ``line_length`` 127: 176 bytes). Measured on the real ``shell`` build
  (../shared/zephyr-native): 182 bytes written in one go answered, 183 lost.
* **RTO floor from the link** (``rto_floor_s``): never below ``MIN_RTO_S``; on BLE at least
  two round trips of the connection events a packet needs (its writes of ``max_write`` bytes
  plus the notification, at up to ``BLE_CONN_INTERVAL_S`` each); with a known link rate at
  least twice the time the packet takes on the wire.
* **Memory.** What worked (packet size, window; the sizes and windows that failed) is kept
  per device (``TuningStore``: the journal's ``link_tuning`` table), so a restarted gateway
  starts there without the failed probes. It is **re-probed from the top** when the device's
  MCUmgr parameters or the link settings differ from those it was learned with (another
  firmware build or another port setup), or after ``REPROBE_AFTER_S`` (7 days): the
  occasional upward probe costs one unanswered first chunk (about a second).
* **Overrides.** ``window`` in the device config is trusted as the device's capacity (start
  and cap, no probing); ``chunk_size`` caps the data bytes of every chunk.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

__all__ = [
    "ChunkControl", "LinkFacts", "LinkMemory", "MemoryStore", "Plan", "TuningStore",
    "WindowControl", "chunk_data_room", "first_chunk_floor_for", "first_resend_s", "kconfig_netbuf",
    "ladder", "learn", "plan_upload", "rto_floor_s",
    "serial_lines", "serial_packet_for_lines",
]

SMP_HEADER = 8
IMAGE_HEADER = 32  # struct image_header: img_mgmt reads it from the first chunk
MAX_WINDOW = 32
# subsys/mgmt/mcumgr/transport/Kconfig defaults (Zephyr 3.4)
KCONFIG_NETBUF_SIZE = 384
KCONFIG_NETBUF_COUNT = 4
KCONFIG_UDP_NETBUF_SIZE = 2048  # "default 2048 if MCUMGR_TRANSPORT_UDP"
# CONFIG_UART_MCUMGR_RX_BUF_COUNT / CONFIG_MCUMGR_TRANSPORT_SHELL_RX_BUF_COUNT defaults
KCONFIG_SERIAL_RX_LINES = 2
SERIAL_FRAME_OVERHEAD = 4  # 2-byte frame length + CRC16 (smp.packet, serial_util.c)
REPROBE_AFTER_S = 7 * 86400.0
GROW_AFTER = 8  # answers per unit of window that kept up before the window grows by one
LOSS_SPAN = 8  # serial: the last chunks of a size that count ...
LOSS_LIMIT = 2  # ... and how many of them lost make the size step down
SHELL_MTU = 256  # CONFIG_MCUMGR_TRANSPORT_SHELL_MTU default (smp_shell.c)
MIN_RTO_S = 0.2  # RFC 6298 allows less than 1 s; below this a busy host fakes losses
BLE_CONN_INTERVAL_S = 0.05  # Zephyr's default peripheral preferred max (40 x 1.25 ms) + slack
# evidence that a request (or its answer) was lost; "timeout" is handled apart (may be spurious)
DATA_LOSS = ("enomem", "rewind", "duplicate", "gap")


class ParamsLike(Protocol):
    buf_size: int
    buf_count: int
    reported: bool


class TuningStore(Protocol):
    """Where per-device link tuning survives a restart (``gateway.journal.Journal``)."""

    def link_tuning(self, device_id: str) -> dict[str, Any] | None: ...

    def put_link_tuning(self, device_id: str, data: dict[str, Any]) -> None: ...


class MemoryStore:
    """A ``TuningStore`` in a dict: one process's memory (benchmarks, ``probe``, tests)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def link_tuning(self, device_id: str) -> dict[str, Any] | None:
        return self.data.get(device_id)

    def put_link_tuning(self, device_id: str, data: dict[str, Any]) -> None:
        self.data[device_id] = dict(data)


# -- sizes --------------------------------------------------------------------------------
def _cbor_extra(n: int) -> int:
    """Bytes of a CBOR head beyond the first for argument ``n``."""
    return 0 if n < 24 else 1 if n < 0x100 else 2 if n < 0x10000 else 4 if n < 0x100000000 else 8


# map(2) + "off" + uint head + "data" + bstr head, without the argument bytes of the heads
_CHUNK_FIXED = 1 + 4 + 1 + 5 + 1


def chunk_data_room(limit: int, off: int) -> int:
    """Most data bytes an ``{"off": off, "data": ...}`` request of ``limit`` bytes carries."""
    room = limit - SMP_HEADER - _CHUNK_FIXED - _cbor_extra(off)
    n = room - _cbor_extra(room)
    while n > 0 and n + _cbor_extra(n) > room:
        n -= 1
    return max(n, 0)


def first_chunk_floor_for(first_overhead: int) -> int:
    """Smallest packet whose first chunk (``first_overhead`` = its size with empty data,
    the 1-byte bstr head included) still carries the 32-byte image header."""
    return first_overhead + _cbor_extra(IMAGE_HEADER) + IMAGE_HEADER


def _per_line(line_length: int) -> int:
    return max(4, ((line_length - 4) // 4) * 4)  # smp.packet.encode: base64 chars per line


def serial_lines(packet: int, line_length: int) -> int:
    """Lines ``smp.packet.encode`` makes of an SMP packet of ``packet`` bytes."""
    chars = 4 * math.ceil((packet + SERIAL_FRAME_OVERHEAD) / 3)
    return max(1, math.ceil(chars / _per_line(line_length)))


def serial_packet_for_lines(lines: int, line_length: int) -> int:
    """Largest SMP packet that ``smp.packet.encode`` frames in at most ``lines`` lines."""
    return (lines * _per_line(line_length)) // 4 * 3 - SERIAL_FRAME_OVERHEAD


# -- facts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkFacts:
    """What the transport says about itself (``Transport`` attributes)."""

    kind: str  # "udp" | "serial" | "ble" | another transport's name
    max_packet: int  # largest SMP packet the link carries in one piece
    netbuf_overhead: int = 0  # bytes of the device's netbuf taken by framing (serial: 4)
    line_length: int | None = None  # serial: smp.packet line length
    shell: bool = False  # serial: SMP over the Zephyr shell (smp_shell.c)
    max_write: int | None = None  # BLE: bytes per ATT write (a packet takes ceil(n/max_write))
    rate: float | None = None  # bytes/s on the wire, when the link knows it (a UART)

    @classmethod
    def of(cls, transport: Any) -> LinkFacts:
        line = getattr(transport, "line_length", None)
        try:
            mw = getattr(transport, "max_write", None)
        except Exception:  # BLE before the link is open: no MTU yet
            mw = None
        try:
            rate = getattr(transport, "link_rate", None)
        except Exception:
            rate = None
        return cls(str(getattr(transport, "name", "?")), int(transport.max_packet),
                   int(getattr(transport, "netbuf_overhead", 0)),
                   int(line) if isinstance(line, int) else None,
                   getattr(transport, "shell", False) is True,
                   int(mw) if isinstance(mw, int) and not isinstance(mw, bool) and mw > 0 else None,
                   float(rate) if isinstance(rate, int | float) and rate > 0 else None)

    @property
    def serial(self) -> bool:
        return self.kind == "serial" and self.line_length is not None

    @property
    def signature(self) -> str:
        extra = f":{self.line_length}" if self.serial else ""
        if self.serial and self.shell:
            extra += ":shell"
        return f"{self.kind}:{self.max_packet}{extra}"


def kconfig_netbuf(kind: str) -> int:
    """The netbuf size assumed when the device does not report its MCUmgr parameters."""
    return KCONFIG_UDP_NETBUF_SIZE if kind == "udp" else KCONFIG_NETBUF_SIZE


def params_signature(params: ParamsLike | None) -> str:
    if params is None or not params.reported:
        return "none"
    return f"{params.buf_size}x{params.buf_count}"


# -- memory -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkMemory:
    """What uploads learned about one device's link (stored as a JSON dict)."""

    packet: int  # SMP packet limit that carried the last upload
    window: int  # largest window that kept up
    packet_failed: int | None = None  # smallest packet size that went unanswered / lossy
    window_failed: int | None = None  # smallest window that lost while probing
    params: str = ""  # params_signature() when learned
    link: str = ""  # LinkFacts.signature when learned
    first_s_per_kb: float = 0.0  # first chunk's answer time (the slot erase) per KiB of image
    probed_at: float = 0.0  # when the size was last probed from the top
    updated_at: float = 0.0
    uploads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> LinkMemory | None:
        """None for anything that is not a record this module wrote (never raises)."""
        if not isinstance(data, dict):
            return None
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name in ("packet", "window"):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    return None
            elif f.name in ("packet_failed", "window_failed"):
                v = v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
            elif f.name in ("params", "link"):
                v = v if isinstance(v, str) else ""
            elif f.name == "first_s_per_kb":
                v = float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else 0.0
            elif f.name == "uploads":
                v = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0
            else:
                v = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0
            kw[f.name] = v
        if "packet" not in kw or "window" not in kw:
            return None
        return cls(**kw)


# -- the plan -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How an upload starts: packet size, window, what may change, and why."""

    packet: int  # SMP packet limit of the first chunk and the ones after it
    window: int  # chunks in flight at the start
    window_cap: int  # never above (the device's reported capacity, or the override)
    trusted_window: int  # windows up to this are known to fit: a loss there is a link loss
    grow_limit: int  # the window may grow up to this (<= window_cap)
    ladder: tuple[int, ...]  # packet sizes to step down to, descending, the floor last
    floor: int  # smallest packet that carries the image header in the first chunk
    chunk_cap: int | None  # config ``chunk_size``: data bytes per chunk, at most
    reason: str
    source: str  # "override" | "memory" | "params" | "defaults"
    reprobe: bool  # probing from the top (no memory, or memory expired / for another build)
    facts: LinkFacts = field(default_factory=lambda: LinkFacts("?", 0))
    params: str = "none"

    @property
    def chunk(self) -> int:
        """Data bytes of a continuation chunk at this packet size (3-byte offsets)."""
        n = chunk_data_room(self.packet, 0x10000)
        return min(n, self.chunk_cap) if self.chunk_cap is not None else n

    def describe(self) -> str:
        grow = (f" grows_to={self.grow_limit}" if self.grow_limit > self.window else "")
        return (f"chunk={self.chunk} packet={self.packet} window={self.window}{grow} "
                f"reason=\"{self.reason}\"")


def ladder(facts: LinkFacts, top: int, floor: int) -> tuple[int, ...]:
    """Packet sizes to try, from ``top`` down to the floor (descending, ``top`` first)."""
    if top <= floor:
        return (top,)
    sizes = {top}
    if facts.serial:
        assert facts.line_length is not None
        lines = serial_lines(top, facts.line_length)
        k = lines
        while k > KCONFIG_SERIAL_RX_LINES:
            k = max(KCONFIG_SERIAL_RX_LINES, k // 2)
            sizes.add(serial_packet_for_lines(k, facts.line_length))
        # sizes of equal line count add nothing: keep the largest of each
        by_lines: dict[int, int] = {}
        for s in sizes:
            n = serial_lines(s, facts.line_length)
            by_lines[n] = max(by_lines.get(n, 0), s)
        sizes = set(by_lines.values())
        if min(sizes) < floor:
            sizes = {s for s in sizes if s >= floor} | {floor}
    else:
        rung = KCONFIG_NETBUF_SIZE - facts.netbuf_overhead
        s = top
        while s // 2 >= floor:
            nxt = s // 2
            if nxt < rung < s:
                nxt = rung
            sizes.add(nxt)
            s = nxt
        sizes.add(floor)
    return tuple(sorted((s for s in sizes if floor <= s <= top), reverse=True))


def plan_upload(
    facts: LinkFacts,
    params: ParamsLike | None,
    memory: LinkMemory | None,
    *,
    floor: int,
    now: float,
    window_override: int | None = None,
    chunk_cap: int | None = None,
    fixed: bool = False,
) -> Plan:
    """The starting point of an upload (see the module docstring for the rules).

    ``fixed``: no discovery at all (benchmark sweeps): the packet is the largest the facts
    allow, the window ``window_override`` (or the start window), and neither ever changes."""
    reported = params is not None and params.reported
    why: list[str] = []
    # 1. the largest packet the known facts allow
    if reported:
        assert params is not None
        dev_max = params.buf_size - facts.netbuf_overhead
        why.append(f"MCUmgr params {params.buf_size}x{params.buf_count}")
    else:
        default = kconfig_netbuf(facts.kind)
        dev_max = default - facts.netbuf_overhead
        why.append(f"no MCUmgr params: Kconfig default netbuf {default}")
    top = max(1, min(facts.max_packet, dev_max))
    if facts.max_packet < dev_max:
        why.append(f"link carries {facts.max_packet}")
    if facts.serial and facts.shell:
        assert facts.line_length is not None
        shell_top = min(SHELL_MTU, serial_packet_for_lines(KCONFIG_SERIAL_RX_LINES, facts.line_length))
        if shell_top < top:
            top = max(1, shell_top)
            why.append(f"shell: MTU {SHELL_MTU}, {KCONFIG_SERIAL_RX_LINES} line buffers -> {top}")
    if facts.netbuf_overhead and top == dev_max:
        why.append(f"-{facts.netbuf_overhead} frame length+CRC")
    # 2. the window the device is known to hold, and how far probing may go
    if window_override is not None:
        cap = trusted = start_w = max(1, min(window_override, MAX_WINDOW))
        why.append(f"window {cap} from the device config")
    elif reported:
        assert params is not None
        cap = max(1, min(params.buf_count - 1, MAX_WINDOW))
        if facts.serial:
            trusted = start_w = 1
            why.append(f"serial line buffers unknown: window 1, may grow to {cap}")
        else:
            trusted = start_w = cap
            why.append(f"window buf_count-1 = {cap}")
    else:
        cap = KCONFIG_NETBUF_COUNT - 1
        trusted = start_w = 1
        why.append(f"window 1, may grow to {cap}")
    grow_limit = cap
    packet = top
    source = "override" if window_override is not None else ("params" if reported else "defaults")
    reprobe = True
    # 3. what this device taught earlier uploads
    psig = params_signature(params)
    if memory is not None:
        stale = None
        if memory.params != psig:
            stale = f"MCUmgr params changed ({memory.params or '?'} -> {psig})"
        elif memory.link != facts.signature:
            stale = f"link settings changed ({memory.link or '?'} -> {facts.signature})"
        elif now - memory.probed_at > REPROBE_AFTER_S:
            stale = f"learned {(now - memory.probed_at) / 86400:.0f} days ago"
        if stale is not None:
            why.append(f"re-probing: {stale}")
        else:
            reprobe = False
            packet = max(1, min(memory.packet, top))
            why = [f"remembered: packet {memory.packet} window {memory.window} "
                   f"({memory.uploads} upload{'s' if memory.uploads != 1 else ''})"]
            if memory.packet_failed:
                why.append(f"{memory.packet_failed} was lossy")
            if window_override is None:
                # the remembered window kept up: start there; above it is a probe
                start_w = trusted = max(1, min(memory.window, cap))
                if memory.window_failed is not None:
                    grow_limit = min(cap, memory.window_failed - 1)
                    why.append(f"window {memory.window_failed} lost")
                source = "memory"
            else:
                why.append(f"window {cap} from the device config")
    if chunk_cap is not None:
        why.append(f"chunk_size {chunk_cap} from the device config")
    grow_limit = max(start_w, min(grow_limit, cap))
    if fixed:
        packet = top
        cap = trusted = grow_limit = start_w
        why = [f"fixed: packet {packet}, window {start_w}"]
        source = "override"
    return Plan(packet=packet, window=start_w, window_cap=cap, trusted_window=trusted,
                grow_limit=grow_limit,
                ladder=(packet,) if fixed else ladder(facts, packet, floor), floor=floor,
                chunk_cap=chunk_cap, reason="; ".join(why), source=source, reprobe=reprobe,
                facts=facts, params=psig)


# -- while uploading ----------------------------------------------------------------------
class WindowControl:
    """The window while uploading: grows while the device keeps up, backs off on loss.

    ``on_answer`` after each answer that advanced the offset by exactly its chunk;
    ``on_loss(kind)`` after a timeout, a rewind (the device expects an earlier offset) or an
    ENOMEM answer. Returns a line for the upload's ``fallbacks`` when the window changed.
    """

    def __init__(self, start: int, *, cap: int, trusted: int, grow_limit: int,
                 grow_after: int = GROW_AFTER, static: bool = False) -> None:
        self.static = static  # never changes (benchmark sweeps)
        self.window = max(1, min(start, cap))
        self.cap = cap
        self.trusted = max(1, min(trusted, cap))
        self.limit = max(self.window, min(grow_limit, cap))
        self.grow_after = grow_after
        self.clean = 0
        self.timeouts = 0  # in a row
        self.kept_up = min(self.window, self.trusted)  # largest window that kept up
        self.failed: int | None = None  # smallest window that lost above the trusted one
        self.max_window = self.window
        self.timed_out: list[int] = []  # windows (> 1) at which a timeout fired

    @property
    def probing(self) -> bool:
        """The current window is above what is known to fit: a loss is the window's fault."""
        return self.window > self.trusted

    def on_answer(self) -> str | None:
        if self.static:
            return None
        self.timeouts = 0
        self.clean += 1
        if self.clean < self.grow_after * self.window:
            return None
        self.clean = 0
        self.kept_up = max(self.kept_up, self.window)
        if self.window >= self.limit:
            return None
        self.window += 1
        self.max_window = max(self.max_window, self.window)
        return f"window {self.window - 1}->{self.window} (device kept up)"

    def on_loss(self, kind: str) -> str | None:
        """``kind``: "timeout", or one of ``DATA_LOSS`` ("enomem", "rewind", "duplicate",
        "gap"): any of those at a window above 1 takes one off, for the rest of the upload,
        and that window is never learned as one that kept up."""
        if self.static:
            return None
        self.clean = 0
        w = self.window
        if kind == "timeout" and w > 1:
            self.timed_out.append(w)  # not learned as kept up, unless found spurious
        if self.probing:
            self.failed = w if self.failed is None else min(self.failed, w)
            self.window = self.limit = max(1, w - 1)
            self.kept_up = min(self.kept_up, self.window)
            return f"window {w}->{self.window} after {kind} (probe: stays there)"
        if kind in DATA_LOSS and w > 1:
            # the device holds fewer requests than we sent (ENOMEM says so; smp_bt drops a
            # write silently and the next answer names the earlier offset): below the capacity
            # it reports, a loss is still the window's until a smaller window shows otherwise
            self.failed = w if self.failed is None else min(self.failed, w)
            self.window = self.trusted = self.limit = w - 1
            self.kept_up = min(self.kept_up, self.window)
            what = "ENOMEM" if kind == "enomem" else f"{kind} (data lost at window {w})"
            return f"window {w}->{w - 1} after {what}"
        if kind == "timeout":
            self.timeouts += 1
            if self.timeouts >= 2 and w > 1:
                self.window = 1
                return f"window {w}->1 after {self.timeouts} timeouts"
        return None

    def on_spurious(self) -> None:
        """A timeout turned out to be a slow answer (it arrived after all)."""
        self.timeouts = max(0, self.timeouts - 1)
        if self.timed_out:
            self.timed_out.pop()

    @property
    def learned(self) -> int:
        """The largest window that kept up without losing anything (what ``learn`` stores)."""
        kept = self.kept_up if self.failed is None else min(self.kept_up, self.failed - 1)
        if self.timed_out:
            kept = min(kept, min(self.timed_out) - 1)
        return max(1, kept)


class ChunkControl:
    """The packet size while uploading: steps down the ladder when a size does not get through."""

    def __init__(self, plan_ladder: Iterable[int], *, step_on_loss: bool,
                 span: int = LOSS_SPAN, limit: int = LOSS_LIMIT) -> None:
        self.ladder = list(plan_ladder)
        self.i = 0
        self.step_on_loss = step_on_loss
        self.recent: deque[bool] = deque(maxlen=span)
        self.loss_limit = limit
        self.failed: int | None = None  # smallest size that did not get through

    @property
    def packet(self) -> int:
        return self.ladder[self.i]

    @property
    def at_floor(self) -> bool:
        return self.i >= len(self.ladder) - 1

    def _fail(self, size: int) -> None:
        self.failed = size if self.failed is None else min(self.failed, size)

    def step_down(self) -> int | None:
        """The next smaller size; None at the floor."""
        if self.at_floor:
            return None
        self.i += 1
        self.recent.clear()
        return self.packet

    def settle(self, size: int, unanswered: Iterable[int] = ()) -> None:
        """A first chunk of ``size`` was answered; larger ``unanswered`` attempts sent before
        it were not (the device handles requests in order: they were lost)."""
        for s in unanswered:
            if s > size:
                self._fail(s)
        below = [j for j, s in enumerate(self.ladder) if s <= size]
        if size not in self.ladder:
            self.ladder = sorted({*self.ladder, size}, reverse=True)
            below = [j for j, s in enumerate(self.ladder) if s <= size]
        self.i = below[0] if below else len(self.ladder) - 1
        self.recent.clear()

    def on_chunk(self, ok: bool) -> str | None:
        """One chunk's fate at the current size (only losses the window is not blamed for)."""
        if not self.step_on_loss:
            return None
        self.recent.append(ok)
        if sum(1 for x in self.recent if not x) < self.loss_limit:
            return None
        old = self.packet
        new = self.step_down()
        if new is None:
            self.recent.clear()
            return None
        self._fail(old)
        return f"packet {old}->{new} after {self.loss_limit} losses in {self.recent.maxlen} chunks"

    def on_spurious(self) -> None:
        """Undo the last loss: the chunk was answered after all, only late."""
        for j in range(len(self.recent) - 1, -1, -1):
            if not self.recent[j]:
                self.recent[j] = True
                return


def rto_floor_s(facts: LinkFacts, packet: int) -> float:
    """The least retransmission timeout the link allows for a ``packet``-byte request.

    A BLE request of n bytes takes ceil(n / max_write) writes without response, its answer at
    least one notification; a peripheral may serve one PDU per connection event, up to
    ``BLE_CONN_INTERVAL_S`` apart: two such round trips are the floor (a timer below that
    fires before a busy but healthy link can answer, and every such timeout re-sends a window).
    With a known link rate (a UART), twice the time the packet takes on the wire."""
    floor = MIN_RTO_S
    if facts.kind == "ble" and facts.max_write:
        events = -(-max(packet, 1) // facts.max_write) + 1
        floor = max(floor, 2 * events * BLE_CONN_INTERVAL_S)
    if facts.rate:
        wire = packet
        if facts.serial and facts.line_length:
            wire = serial_lines(packet, facts.line_length) * (facts.line_length + 1)
        floor = max(floor, 2 * wire / facts.rate)
    return floor


FIRST_RESEND_MIN_S = 1.0
FIRST_RESEND_MAX_S = 20.0


def first_resend_s(memory: LinkMemory | None, image_size: int) -> float:
    """How long an unanswered first chunk waits before it is sent again (one rung smaller).

    The device erases the image area before it answers (``img_mgmt_erase_image_data``; seconds
    on real flash, and an nRF52840 or STM32 CPU halts meanwhile, so nothing it receives then
    survives): 1 s, or 1.5x the erase time this device showed for an image of this size."""
    if memory is None or memory.first_s_per_kb <= 0:
        return FIRST_RESEND_MIN_S
    guess = 1.5 * memory.first_s_per_kb * image_size / 1024
    return max(FIRST_RESEND_MIN_S, min(FIRST_RESEND_MAX_S, guess))


def learn(plan: Plan, chunks: ChunkControl, window: WindowControl, previous: LinkMemory | None,
          *, now: float, first_s_per_kb: float | None = None) -> LinkMemory:
    """What to remember after a completed upload (``first_s_per_kb``: the first chunk's answer
    time per KiB of image when it started a fresh upload, i.e. erased)."""
    keep = previous if previous is not None and not plan.reprobe else None
    if first_s_per_kb is None:
        first_s_per_kb = previous.first_s_per_kb if previous is not None else 0.0
    packet_failed = chunks.failed
    if keep is not None and keep.packet_failed is not None:
        packet_failed = keep.packet_failed if packet_failed is None else min(packet_failed,
                                                                            keep.packet_failed)
    window_failed = window.failed
    if keep is not None and keep.window_failed is not None:
        window_failed = keep.window_failed if window_failed is None else min(window_failed,
                                                                            keep.window_failed)
    return LinkMemory(
        packet=chunks.packet, window=window.learned, packet_failed=packet_failed,
        window_failed=window_failed, params=plan.params, link=plan.facts.signature,
        first_s_per_kb=first_s_per_kb,
        probed_at=now if keep is None else keep.probed_at, updated_at=now,
        uploads=(keep.uploads if keep is not None else 0) + 1)


def same_knowledge(a: LinkMemory | None, b: LinkMemory) -> bool:
    """``a`` and ``b`` say the same about the link (timestamps and counters aside)."""
    if a is None:
        return False
    def key(m: LinkMemory) -> LinkMemory:
        return replace(m, probed_at=0.0, updated_at=0.0, uploads=0, first_s_per_kb=0.0)

    return key(a) == key(b)
