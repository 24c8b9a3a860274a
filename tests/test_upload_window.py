"""Windowed upload (gateway/smp/upload.py) against a scripted SMP responder on a real UDP socket.

The responder implements Zephyr's img_mgmt upload rules (img_mgmt.c ``img_mgmt_upload_inspect``:
a chunk at an unexpected offset is dropped and answered with the offset expected; the first
chunk with the ``sha`` of the upload in progress is answered with its offset) and MCUmgr
parameters, plus a script that loses, delays (reorders) or duplicates requests and answers
exactly where a test says. No timing assertions: only outcomes and counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest
from smpclient.requests.image_management import ImageUploadWrite

from gateway.smp.session import SMPSession, UploadError
from gateway.smp.transport import UdpTransport
from gateway.smp.upload import chunk_data_room, encode_chunk

HDR = struct.Struct("!BBHHBB")
IMAGE_MAGIC = 0x96F3B83D


def make_image(size: int) -> bytes:
    body = bytearray(hashlib.sha256(b"x").digest() * (size // 32 + 1))[:size]
    body[:4] = IMAGE_MAGIC.to_bytes(4, "little")
    return bytes(body)


@dataclass
class Req:
    n: int  # arrival index of upload requests
    seq: int
    off: int
    data_len: int


@dataclass
class Responder(asyncio.DatagramProtocol):
    """A tiny smp_svr: MCUmgr params + image upload, with scripted faults."""

    buf_size: int = 2475
    buf_count: int = 4
    params_supported: bool = True
    # script hooks, called per upload request (arrival order):
    drop_request: Callable[[Req], bool] = lambda r: False
    drop_response: Callable[[Req], bool] = lambda r: False
    delay_response: Callable[[Req], float] = lambda r: 0.0
    hold_request: Callable[[Req], float] = lambda r: 0.0  # process it later (request reorder)
    duplicate_response: Callable[[Req], bool] = lambda r: False
    enomem: Callable[[Req], bool] = lambda r: False  # smp.c: no netbuf for the answer
    # smp_udp.c copies a datagram into one netbuf: larger than buf_size -> lost
    enforce_buf_size: bool = False
    # a device that holds at most `capacity` upload requests, each handled `processing_s`
    # after the previous one: a request arriving with `capacity` held is dropped
    capacity: int | None = None
    processing_s: float = 0.0
    processing: Callable[[Req], float] | None = None  # per request (overrides processing_s)
    dropped_oversize: int = 0
    dropped_busy: int = 0
    _held: int = 0
    _busy_until: float = 0.0
    # the device's upload state (g_img_mgmt_state)
    size: int = 0
    off: int = 0
    sha: bytes = b""
    active: bool = False
    flash: bytearray = field(default_factory=bytearray)
    log: list[Req] = field(default_factory=list)
    wrong_offset_answers: int = 0
    transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    @property
    def port(self) -> int:
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        _op, _f, length, group, seq, cmd = HDR.unpack_from(data)
        body = cbor2.loads(data[8 : 8 + length]) if length else {}
        if (group, cmd) == (0, 6):
            rsp = ({"buf_size": self.buf_size, "buf_count": self.buf_count}
                   if self.params_supported else {"rc": 8})
            self._send(data, rsp, addr, 0.0)
            return
        if (group, cmd) != (1, 1):
            self._send(data, {"rc": 8}, addr, 0.0)
            return
        if self.enforce_buf_size and len(data) > self.buf_size:
            self.dropped_oversize += 1
            return
        req = Req(len(self.log), seq, body["off"], len(body.get("data", b"")))
        self.log.append(req)
        if self.drop_request(req):
            return
        if self.capacity is not None:
            if self._held >= self.capacity:
                self.dropped_busy += 1
                return
            loop = asyncio.get_running_loop()
            self._held += 1
            t = self.processing(req) if self.processing is not None else self.processing_s
            self._busy_until = max(self._busy_until, loop.time()) + t
            loop.call_at(self._busy_until, self._release, data, body, req, addr)
            return
        if self.enomem(req):  # the chunk is not processed; {"rc": ENOMEM} in its own buffer
            self._send(data, {"rc": 2}, addr, 0.0)
            return
        hold = self.hold_request(req)
        if hold:
            asyncio.get_running_loop().call_later(hold, self._upload, data, body, req, addr)
        else:
            self._upload(data, body, req, addr)

    def _release(self, data: bytes, body: dict[str, Any], req: Req, addr: Any) -> None:
        self._held -= 1
        self._upload(data, body, req, addr)

    def _upload(self, data: bytes, body: dict[str, Any], req: Req, addr: Any) -> None:
        off, chunk = body["off"], body.get("data", b"")
        if off == 0:
            sha = body.get("sha", b"")
            if self.active and sha and sha == self.sha:
                rsp: dict[str, Any] = {"off": self.off}  # resume
                return self._respond(data, rsp, req, addr)
            self.size, self.sha, self.off, self.active = body["len"], sha, 0, True
            self.flash = bytearray(b"\xff" * self.size)
        elif not self.active or off != self.off:
            self.wrong_offset_answers += 1
            return self._respond(data, {"off": self.off}, req, addr)
        self.flash[off : off + len(chunk)] = chunk
        self.off += len(chunk)
        rsp = {"off": self.off}
        if self.off == self.size:
            rsp["match"] = hashlib.sha256(self.flash).digest() == self.sha
            self.active = False
        self._respond(data, rsp, req, addr)

    def _respond(self, data: bytes, rsp: dict[str, Any], req: Req, addr: Any) -> None:
        if self.drop_response(req):
            return
        self._send(data, rsp, addr, self.delay_response(req))
        if self.duplicate_response(req):
            self._send(data, rsp, addr, 0.001)

    def _send(self, data: bytes, rsp: dict[str, Any], addr: Any, delay: float) -> None:
        op, _f, _l, group, seq, cmd = HDR.unpack_from(data)
        body = cbor2.dumps(rsp)
        pkt = HDR.pack((op & 0x18) | (op & 7) + 1, 0, len(body), group, seq, cmd) + body
        if delay:
            asyncio.get_running_loop().call_later(delay, self.transport.sendto, pkt, addr)
        else:
            self.transport.sendto(pkt, addr)


async def start(responder: Responder) -> Responder:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: responder, local_addr=("127.0.0.1", 0))
    return responder


class Watch:
    """Wraps the session's transport: the most requests ever awaiting an answer."""

    def __init__(self, s: SMPSession) -> None:
        self.max_pending = 0
        orig = s.transport.send

        async def send(pkt: bytes) -> None:
            self.max_pending = max(self.max_pending, len(s._pending))
            await orig(pkt)

        s.transport.send = send  # type: ignore[method-assign,assignment]


async def upload(r: Responder, image: bytes, **kw: Any) -> tuple[Any, Watch]:
    s = SMPSession(UdpTransport("127.0.0.1", r.port), device_id="t", timeout_s=1.0)
    async with s:
        w = Watch(s)
        stats = await s.upload(image, **kw)
    return stats, w


def done_ok(r: Responder, image: bytes) -> bool:
    return bytes(r.flash) == image and not r.active


IMAGE = make_image(40_000)  # ~28 chunks of ~1.45 KB over UDP


# -- encoding ----------------------------------------------------------------------------
@pytest.mark.parametrize("off", [1, 23, 24, 255, 256, 65535, 65536, 1 << 32])
@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 2000])
def test_hand_encoded_chunk_is_smpclients_encoding(off: int, n: int) -> None:
    data = bytes(range(256)) * (n // 256 + 1)
    data = data[:n]
    assert encode_chunk(7, off, data) == ImageUploadWrite(off=off, data=data, sequence=7).BYTES


@pytest.mark.parametrize("limit", [100, 384, 1472, 2471, 4096])
@pytest.mark.parametrize("off", [100, 70_000])
def test_chunk_fills_the_packet_limit_exactly(limit: int, off: int) -> None:
    n = chunk_data_room(limit, off)
    assert len(encode_chunk(1, off, b"\0" * n)) <= limit
    assert len(encode_chunk(1, off, b"\0" * (n + 1))) > limit


# -- the window --------------------------------------------------------------------------
async def test_clean_link_uses_the_window_and_fills_packets() -> None:
    r = await start(Responder(buf_count=4))
    stats, w = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.window == 3 and w.max_pending == 3
    assert stats.retransmits == 0 and stats.rewinds == 0
    # every continuation datagram fills the UDP payload (1500 - 28) exactly, but the last
    full = [q for q in r.log[1:-1]]
    assert all(len(encode_chunk(0, q.off, b"\0" * q.data_len)) == 1472 for q in full)


@pytest.mark.parametrize("buf_count,window", [(2, 1), (4, 3), (8, 7)])
async def test_window_is_buf_count_minus_one(buf_count: int, window: int) -> None:
    r = await start(Responder(buf_count=buf_count))
    stats, w = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.window == window and w.max_pending <= window


async def test_configured_window_caps_the_device_window() -> None:
    r = await start(Responder(buf_count=8))
    stats, w = await upload(r, IMAGE, window=2)
    assert done_ok(r, IMAGE) and stats.window == 2 and w.max_pending <= 2


async def test_small_device_buffer_limits_the_chunk() -> None:
    r = await start(Responder(buf_size=384))
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert all(len(encode_chunk(0, q.off, b"\0" * q.data_len)) <= 384 for q in r.log[1:])
    assert stats.chunk_size == chunk_data_room(384, 1000)


# -- losses, reordering, duplicates -------------------------------------------------------
async def test_lost_responses_are_loss_evidence_but_cost_no_resend_when_answered_later() -> None:
    r = await start(Responder(drop_response=lambda q: q.n in (3, 7)))
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.retransmits == 0 and stats.rewinds == 0  # offsets are cumulative
    assert stats.retransmitted_bytes == 0
    # a silent gap is evidence of loss (tuning.DATA_LOSS): the window steps down, once each
    assert stats.gaps == 2 and stats.window == 3 and stats.window_final == 1


async def test_lost_last_response_is_retransmitted_after_a_timeout() -> None:
    dropped: set[int] = set()

    def drop(q: Req) -> bool:  # the answer to the final chunk, once
        if q.off + q.data_len == len(IMAGE) and not dropped:
            dropped.add(q.n)
            return True
        return False

    r = await start(Responder(drop_response=drop))
    stats, _ = await upload(r, IMAGE)
    assert dropped and stats.retransmits >= 1
    assert bytes(r.flash) == IMAGE


async def test_lost_requests_rewind_on_the_expected_offset() -> None:
    r = await start(Responder(drop_request=lambda q: q.n in (4, 12)))
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.rewinds >= 2  # the device said "I expect X" for the chunk after each loss
    assert r.wrong_offset_answers >= 2


async def test_reordered_responses() -> None:
    # answers of chunks 2, 5, 9 overtaken by the answers of the chunks after them
    r = await start(Responder(delay_response=lambda q: 0.03 if q.n in (2, 5, 9) else 0.0))
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.rewinds == 0 and stats.restarts == 0


async def test_reordered_requests() -> None:
    # request 3 reaches the device after request 4: 4 is answered with "expect 3's offset"
    r = await start(Responder(hold_request=lambda q: 0.02 if q.n == 3 else 0.0))
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert r.wrong_offset_answers >= 1 and stats.rewinds >= 1


async def test_duplicate_responses_are_ignored() -> None:
    r = await start(Responder(duplicate_response=lambda q: True))
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.rewinds == 0 and stats.retransmits == 0


async def test_offset_rejected_by_the_device() -> None:
    """The device answers a chunk with the offset it expects (its own choice, e.g. it kept
    less than it acknowledged before a power blip): the client continues from there."""
    r = await start(Responder())
    state = {"done": False}
    orig = r._upload

    def rejecting(data: bytes, body: dict[str, Any], req: Req, addr: Any) -> None:
        if req.n == 10 and not state["done"]:
            state["done"] = True
            r.off -= 1000  # "I expect an offset 1000 bytes earlier"
            r.wrong_offset_answers += 1
            return r._respond(data, {"off": r.off}, req, addr)
        orig(data, body, req, addr)

    r._upload = rejecting  # type: ignore[method-assign]
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.rewinds >= 1 and stats.restarts == 0


async def test_resume_in_the_middle_of_a_window() -> None:
    """An earlier upload of the same image stopped at an offset that is not a chunk boundary
    of this one: the first chunk's answer says where, and the upload continues from there."""
    r = await start(Responder())
    r.size, r.sha, r.active = len(IMAGE), hashlib.sha256(IMAGE).digest(), True
    r.flash = bytearray(IMAGE[:12_345] + b"\xff" * (len(IMAGE) - 12_345))
    r.off = 12_345
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.start_offset == 12_345
    assert r.log[1].off == 12_345  # the first continuation starts exactly there
    assert r.wrong_offset_answers == 0


async def test_device_restart_mid_upload_starts_again() -> None:
    r = await start(Responder())
    orig = r._upload
    state = {"done": False}

    def rebooting(data: bytes, body: dict[str, Any], req: Req, addr: Any) -> None:
        if req.n == 9 and not state["done"]:
            state["done"] = True
            r.active, r.off = False, 0  # RAM state lost
        orig(data, body, req, addr)

    r._upload = rebooting  # type: ignore[method-assign]
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.restarts == 1


async def test_enomem_answer_shrinks_the_window_and_resends() -> None:
    """Zephyr answers {"rc": ENOMEM} when no netbuf is left for the response (more requests
    held than buf_count - 1): the chunk was not written; the client sends it again."""
    r = await start(Responder(enomem=lambda q: q.n in (5, 9)))
    stats, _ = await upload(r, IMAGE, window=4)
    assert done_ok(r, IMAGE)
    assert [f for f in stats.fallbacks if "ENOMEM" in f] == [
        f for f in stats.fallbacks if f.startswith("window")]
    assert stats.window == 4 and any("window 4->3" in f for f in stats.fallbacks)


# -- fallbacks ----------------------------------------------------------------------------
async def test_without_mcumgr_params_starts_at_window_1_and_the_link_mtu() -> None:
    """No parameters (stock smp_svr): the window starts at 1 and only grows while the device
    keeps up, never above the Kconfig default capacity (3); packets fill the UDP MTU, as
    smpclient's do (Zephyr's UDP transport defaults to 2048-byte netbufs)."""
    r = await start(Responder(params_supported=False))
    stats, w = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert stats.window == 1 and stats.retransmits == 0 and stats.rewinds == 0
    assert 1 < stats.window_max <= 3 and w.max_pending <= 3
    assert any("window 1->2 (device kept up)" in f for f in stats.fallbacks)
    assert all(len(encode_chunk(0, q.off, b"\0" * q.data_len)) == 1472 for q in r.log[1:-1])


async def test_falls_back_to_window_1_when_the_device_misbehaves() -> None:
    # a black hole for a while: requests 6 to 11 are ignored
    r = await start(Responder(drop_request=lambda q: 6 <= q.n <= 11))
    stats, _ = await upload(r, IMAGE)
    assert done_ok(r, IMAGE)
    assert any("window 3->1" in f for f in stats.fallbacks)


async def test_gives_up_when_the_device_stops_answering() -> None:
    r = await start(Responder(drop_request=lambda q: q.n >= 3))
    with pytest.raises(UploadError, match="no progress"):
        await upload(r, IMAGE, max_stalls=3)


async def test_mismatching_image_is_an_error() -> None:
    r = await start(Responder())
    orig = r._upload

    def corrupting(data: bytes, body: dict[str, Any], req: Req, addr: Any) -> None:
        if body.get("data") and req.n == 5:
            body = {**body, "data": bytes(len(body["data"]))}
        orig(data, body, req, addr)

    r._upload = corrupting  # type: ignore[method-assign]
    with pytest.raises(UploadError, match="does not match"):
        await upload(r, IMAGE)


# -- against the device simulator ------------------------------------------------------------
@pytest.mark.parametrize("loss", [0.05])
async def test_simulator_lossy_link_completes_with_hash_match(bench_factory: Any, loss: float) -> None:
    from gateway.daemon import make_transport
    from gateway.mcuboot import parse_image
    from gateway.sim.simulator import Simulator

    bench = bench_factory(udp=1, serial=0, device_kw={
        "mcumgr_params_supported": True,
        "link": {"latency_s": 0.002, "request_loss": loss, "response_loss": loss,
                 "reorder": 0.02, "duplicate": 0.02, "seed": 7}})
    v2 = Path(bench.images["2.0.0"]).read_bytes()
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        async with SMPSession(make_transport(cfg.devices[0]), device_id="t", timeout_s=2.0) as s:
            stats = await s.upload(v2)
        info = dev.image_info(1)
        assert info is not None and info.hash == parse_image(v2).hash
        assert dev.counters["lost_requests"] + dev.counters["lost_responses"] > 0
        assert stats.window == 3


async def test_simulator_serial_chunks_fill_buf_size_minus_4(bench_factory: Any) -> None:
    from gateway.daemon import make_transport
    from gateway.sim.simulator import Simulator

    # parameters reported (1024): serial packets fill buf_size - 4 (the device's RX line
    # buffers keep up here: the simulator frees them at once)
    bench = bench_factory(udp=0, serial=1, device_kw={"buf_size": 1024,
                                                      "mcumgr_params_supported": True})
    v2 = Path(bench.images["2.0.0"]).read_bytes()
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        async with SMPSession(make_transport(cfg.devices[0]), device_id="t") as s:
            stats = await s.upload(v2)
        assert stats.chunk_size == chunk_data_room(1024 - 4, 1000)
        assert dev.counters["dropped_oversize"] == 0
        assert dev.image_info(1) is not None


async def test_simulator_window_beyond_buf_count_recovers(bench_factory: Any) -> None:
    """A window of buf_count (one too many for Zephyr's shared request/response pool): the
    device drops or answers ENOMEM; the upload still completes, with a smaller window."""
    from gateway.daemon import make_transport
    from gateway.mcuboot import parse_image
    from gateway.sim.simulator import Simulator

    bench = bench_factory(udp=1, serial=0, device_kw={"buf_count": 3, "request_processing_s": 0.003,
                                                      "link": {"latency_s": 0.002}})
    v2 = Path(bench.images["2.0.0"]).read_bytes()
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        async with SMPSession(make_transport(cfg.devices[0]), device_id="t", timeout_s=2.0) as s:
            stats = await s.upload(v2, window=3)
        info = dev.image_info(1)
        assert info is not None and info.hash == parse_image(v2).hash
        assert dev.counters["enomem"] + dev.counters["dropped_netbuf"] > 0
        assert stats.fallbacks
