"""Helpers for the update-safety tests: catch an SMP request at a simulated device.

The simulator (``gateway/sim``) is the device under the gateway, not the code under test, so
these helpers wrap its entry point for complete SMP packets (``SimDevice.frame_arrived``) to
act at an exact point of the conversation - e.g. "the watchdog fires just as the confirm
arrives" - instead of hoping a timer lands there.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from gateway.mcuboot import parse_image
from gateway.sim.device import SimDevice

HDR = struct.Struct("!BBHHBB")


@dataclass(frozen=True)
class Request:
    op: int
    group: int
    cmd: int
    seq: int
    body: dict[str, Any]

    @property
    def is_state_write(self) -> bool:
        return self.op == 2 and self.group == 1 and self.cmd == 0

    @property
    def is_confirm(self) -> bool:
        return self.is_state_write and self.body.get("confirm") is True

    @property
    def is_test(self) -> bool:
        return self.is_state_write and not self.body.get("confirm")

    @property
    def is_upload(self) -> bool:
        return self.op == 2 and self.group == 1 and self.cmd == 1

    @property
    def is_reset(self) -> bool:
        return self.op == 2 and self.group == 0 and self.cmd == 5


def parse_request(frame: bytes) -> Request | None:
    if len(frame) < HDR.size:
        return None
    op, _f, length, group, seq, cmd = HDR.unpack_from(frame)
    try:
        body = cbor2.loads(frame[HDR.size:HDR.size + length]) if length else {}
    except Exception:
        body = {}
    return Request(op & 7, group, cmd, seq, body if isinstance(body, dict) else {})


Reply = Callable[[bytes], None]
# (request, frame, reply) -> True: the device receives it as usual; False: swallowed
Hook = Callable[[Request, bytes, Reply], bool]


@dataclass
class Tap:
    """Every SMP request a device received (while running), and a hook to act on them."""

    dev: SimDevice
    hook: Hook | None = None
    seen: list[Request] = field(default_factory=list)

    _orig: Callable[..., None] | None = None

    def install(self) -> Tap:
        self._orig = orig = self.dev.frame_arrived

        def frame_arrived(frame: bytes, reply: Reply, **kw: Any) -> None:
            req = parse_request(frame)
            if req is not None and self.dev.accepting():
                self.seen.append(req)
                if self.hook is not None and not self.hook(req, frame, reply):
                    return
            orig(frame, reply, **kw)

        self.dev.frame_arrived = frame_arrived  # type: ignore[method-assign]
        return self

    def deliver(self, frame: bytes, reply: Reply) -> None:
        """Hand ``frame`` to the device past the hook (e.g. with a reply that goes nowhere)."""
        assert self._orig is not None
        self._orig(frame, reply, limit_in_flight=True)

    def requests(self, pred: Callable[[Request], bool]) -> list[Request]:
        return [r for r in self.seen if pred(r)]


def crash_now(dev: SimDevice, why: str = "watchdog") -> None:
    """The running application dies now (watchdog reset): MCUboot runs at the next boot."""
    dev._event("crash", {"reason": why, "injected": True})
    dev._start_reboot(why)


def slot1_flags(dev: SimDevice) -> dict[str, bool]:
    st = next((s for s in dev.server.state_images() if s.slot == 1), None)
    if st is None:
        return {}
    return {k: bool(getattr(st, k)) for k in ("pending", "permanent", "confirmed", "active")}


def active_state(dev: SimDevice) -> tuple[str | None, bool]:
    a = next((s for s in dev.server.state_images() if s.active), None)
    return (a.version if a else None, bool(a and a.confirmed))


# --- MCUboot TLV surgery: what a third party can do to a signed image without the key --------
def with_unprotected_tlv(data: bytes, tlv: int, value: bytes) -> bytes:
    """Append a TLV to the unprotected area (the signature does not cover it)."""
    info = parse_image(data)
    off = info.hdr_size + info.img_size + info.protect_tlv_size
    magic, length = struct.unpack_from("<HH", data, off)
    assert magic == 0x6907
    end = off + length
    new = struct.pack("<BBH", tlv, 0, len(value)) + value
    out = bytearray(data[:end] + new + data[end:])
    struct.pack_into("<HH", out, off, magic, length + len(new))
    return bytes(out)


def replace_tlv(data: bytes, tlv: int, value: bytes) -> bytes:
    """Overwrite the value of an unprotected TLV (same length)."""
    info = parse_image(data)
    off = info.hdr_size + info.img_size + info.protect_tlv_size + 4
    while off < info.total_size:
        t, _, ln = struct.unpack_from("<BBH", data, off)
        if t == tlv:
            assert ln == len(value)
            return data[:off + 4] + value + data[off + 4 + ln:]
        off += 4 + ln
    raise AssertionError(f"no TLV 0x{tlv:02x}")


# --- sessions as the devices see them ----------------------------------------------------------
def track_sessions(sim: Any) -> dict[tuple[str, Any], list[float]]:
    """(device, gateway UDP source address) -> [first, last] time a request of it was served.

    Every gateway session opens its own UDP socket, so a source address is a session as the
    device sees it (recorded through the simulator's waiter hook, run at every served request).
    """
    spans: dict[tuple[str, Any], list[float]] = {}

    def observer(dev: Any) -> bool:
        src = dev._last_source
        if src is not None and dev.counters["requests"]:
            now = asyncio.get_running_loop().time()
            span = spans.setdefault((dev.id, src), [now, now])
            span[1] = now
        return False

    for dev in sim.devices.values():
        asyncio.get_running_loop().create_task(dev.wait_for(observer, timeout_s=3600))
    return spans


def max_overlap(spans: list[list[float]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    cur = best = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best
