"""The simulator speaks like the real firmware: zcbor encoding, stock-sample answers, presets,
and the serial transports' receive paths (uart_mcumgr.c RX buffers, smp_shell.c line buffers
and MTU, CPU stalls while flash is written).

Real PTYs and UDP sockets; frames are built with the ``smp`` package's serial framing and
raw headers so the bytes on the wire can be asserted. Waits are on simulator counters/events.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import tty
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from smp import packet as smppacket
from smpclient import SMPClient
from smpclient.generics import error, success
from smpclient.requests.image_management import ImageStatesRead
from smpclient.requests.os_management import MCUMgrParametersRead
from smpclient.transport.udp import SMPUDPTransport

from gateway.devkit import make_key, sign_image
from gateway.sim import SimConfig, SimDevice, SimDeviceConfig, Simulator, load_sim_config
from gateway.sim.presets import PRESETS
from gateway.sim.serial_rx import LineRx

pytestmark = pytest.mark.timeout(60)
SLOT = 0x20000
FAST: dict[str, Any] = dict(request_processing_s=0.0, flash_write_bps=None,
                            flash_erase_sector_s=0.0, flash_stalls_cpu=False, swap_time_s=0.0)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kit")
    key = make_key(root / "k.pem")
    return {"key": key,
            "v1": sign_image(root / "v1.bin", version="1.0.0", key=key, size=12000, slot_size=SLOT),
            "v2": sign_image(root / "v2.bin", version="2.0.0", key=key, size=14000, slot_size=SLOT)}


@pytest.fixture
async def make_sim(tmp_path: Path) -> AsyncIterator[Any]:
    sims: list[Simulator] = []

    async def make(**kw: Any) -> SimDevice:
        base: dict[str, Any] = {"id": "d1", "slot_size": SLOT, "boot_time_s": 0.05,
                                "reset_delay_s": 0.05}
        base.update(kw)
        sim = Simulator(SimConfig(state_dir=tmp_path / f"state{len(sims)}",
                                  devices=[SimDeviceConfig.model_validate(base)]))
        await sim.start()
        sims.append(sim)
        return sim.devices["d1"]

    yield make
    for s in sims:
        await s.stop()


def req(op: int, group: int, cmd: int, body: Any, seq: int = 1) -> bytes:
    data = cbor2.dumps(body)
    return struct.pack("!BBHHBB", op | 8, 0, len(data), group, seq, cmd) + data


def lines(packet: bytes) -> list[bytes]:
    return list(smppacket.encode(packet, line_length=127))


class RawSerial:
    """The host end of a simulated device's PTY: raw writes, decoded answers."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        self.buf = bytearray()
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()
        self._dec: Any = None
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            self.buf += os.read(self.fd, 65536)
        except BlockingIOError:
            return
        while b"\n" in self.buf:
            i = self.buf.index(b"\n")
            line = bytes(self.buf[: i + 1])
            del self.buf[: i + 1]
            if line.startswith(smppacket.START_DELIMITER):
                self._dec = smppacket.decode()
                next(self._dec)
            elif not line.startswith(smppacket.CONTINUE_DELIMITER) or self._dec is None:
                continue
            try:
                self._dec.send(line)
            except StopIteration as done:
                self.frames.put_nowait(bytes(done.value))
                self._dec = None

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    async def answers(self, n: int, timeout_s: float) -> list[bytes]:
        out: list[bytes] = []
        try:
            while len(out) < n:
                out.append(await asyncio.wait_for(self.frames.get(), timeout_s))
        except TimeoutError:
            pass
        return out

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


# --- encoding and stock-sample answers -------------------------------------------------------
async def test_zcbor_indefinite_by_default_and_canonical_knob(kit: dict[str, Path],
                                                            make_sim: Any) -> None:
    dev = await make_sim(serial={}, initial_image=kit["v1"], key=kit["key"], **FAST)
    assert dev.state == "running"
    s = RawSerial(dev.address)
    try:
        s.write(b"".join(lines(req(0, 1, 0, {}))))
        (rsp,) = await s.answers(1, 3)
        body = rsp[8:]
        # zcbor: indefinite map and array, keys in img_mgmt_state.c's order
        assert body[0] == 0xBF and body[-1] == 0xFF
        assert body[1:8] == b"\x66images" and body[8] == 0x9F
        slot = cbor2.loads(body)["images"][0]
        assert list(slot) == ["slot", "version", "hash", "bootable", "pending", "confirmed",
                              "active", "permanent"]
        assert list(cbor2.loads(body)) == ["images", "splitStatus"]
        assert struct.unpack_from("!H", rsp, 2)[0] == len(body)  # length of what is sent
        # stock smp_svr: MCUmgr parameters, OS info, bootloader info are not built in
        for cmd in (6, 7, 8):
            s.write(b"".join(lines(req(0, 0, cmd, {}, seq=cmd))))
            (rsp,) = await s.answers(1, 3)
            assert rsp[8:] == bytes.fromhex("bf62726308ff")  # {"rc": 8} ENOTSUP, as zcbor writes it
    finally:
        s.close()
    dev2 = await make_sim(id="d1", udp={"host": "127.0.0.1", "port": 0}, cbor="canonical",
                          mcumgr_params_supported=True, initial_image=kit["v1"], **FAST)
    host, port = dev2.address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.sendto(req(0, 0, 6, {}), (host, int(port)))
        rsp = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3)
        assert rsp[8:] == cbor2.dumps({"buf_size": 384, "buf_count": 4})  # definite, 384/4
    finally:
        sock.close()


async def test_smpclient_reads_zcbor_answers_and_params_enotsup(kit: dict[str, Path],
                                                                make_sim: Any) -> None:
    ip = f"127.0.{os.getpid() % 250 + 1}.{os.getpid() // 250 % 250 + 2}"
    dev = await make_sim(udp={"host": ip, "port": 1337}, initial_image=kit["v1"], **FAST)
    c = SMPClient(SMPUDPTransport(), ip, 3.0)
    await c.connect()
    try:
        r = await c.request(MCUMgrParametersRead())
        assert error(r) and r.rc == 8  # what smpmgr warns about on a stock build
        r = await c.request(ImageStatesRead())
        assert success(r) and [(i.slot, i.version, i.active) for i in r.images] == [
            (0, "1.0.0", True)]
    finally:
        await c.disconnect()
    assert dev.counters["requests.1.0"] == 1 and dev.counters["requests.0.6"] >= 1


# --- presets -------------------------------------------------------------------------------
def test_presets_fill_unset_fields_and_explicit_fields_win(tmp_path: Path) -> None:
    (tmp_path / "sim.yaml").write_text(
        "state_dir: st\n"
        "devices:\n"
        "  - {id: r1, preset: renode-stm32f4-disco, serial: {link: tty0}}\n"
        "  - {id: r2, preset: renode-stm32f4-disco, time_scale: 0.01, buf_count: 2,\n"
        "     udp: {port: 0}}\n"
        "  - {id: u1, preset: zephyr-udp}\n"
        "  - {id: s1, preset: zephyr-shell}\n"
    )
    r1, r2, u1, s1 = load_sim_config(tmp_path / "sim.yaml").devices
    assert r1.serial is not None and r1.serial.transport == "uart"
    assert (r1.serial.rx_buf_count, r1.serial.line_buf_size) == (2, 128)
    assert r1.serial.link == tmp_path / "tty0"
    assert (r1.buf_size, r1.buf_count, r1.mcumgr_params_supported) == (384, 4, True)
    assert (r1.slot_size, r1.os_info_supported, r1.bootloader_info_supported) == (
        0x40000, False, False)
    assert r1.time_scale == 1.0 and r1.swap_time_s == 35.0
    # explicit fields override; naming another transport replaces the preset's
    assert r2.time_scale == 0.01 and r2.buf_count == 2
    assert r2.udp is not None and r2.serial is None
    assert u1.udp is not None and u1.udp.port == 1337 and not u1.mcumgr_params_supported
    assert s1.serial is not None and s1.serial.transport == "shell" and s1.serial.shell_mtu == 256
    assert set(PRESETS) >= {"zephyr-uart", "zephyr-shell", "zephyr-udp", "renode-stm32f4-disco"}
    # a dump/validate round trip keeps the resolved values
    again = SimDeviceConfig.model_validate(r1.model_dump())
    assert again == r1
    (tmp_path / "bad.yaml").write_text("state_dir: st\ndevices: [{id: x, preset: nrf-dream}]\n")
    with pytest.raises(ValueError, match=r"unknown preset .nrf-dream.*zephyr-uart"):
        load_sim_config(tmp_path / "bad.yaml")


# --- UART transport: RX buffers ----------------------------------------------------------------
def test_line_rx_model_uart_and_shell() -> None:
    got: list[bytes] = []
    rx = LineRx("uart", buf_count=2, buf_size=128, work_latency_s=0.01)
    # three lines, 1 ms apart: the third finds both buffers still held -> dropped
    rx.feed(b"a" * 10 + b"\n" + b"b" * 10 + b"\n" + b"c" * 10 + b"\n", 0.0, 0.0032,
            smp_busy=False, emit=got.append)
    assert [g[0:1] for g in got] == [b"a", b"b"] and rx.counters["rx_lines_no_buffer"] == 1
    # slow enough (each line takes longer than the work handler): all kept
    got.clear()
    rx.reset()
    rx.feed(b"a" * 50 + b"\n" + b"b" * 50 + b"\n" + b"c" * 50 + b"\n", 1.0, 1.0459,
            smp_busy=False, emit=got.append)
    assert len(got) == 3
    # a line longer than the RX buffer is dropped, the next one is kept
    got.clear()
    rx.feed(b"x" * 200 + b"\n" + b"y\n", 2.0, 2.2, smp_busy=False, emit=got.append)
    assert got == [b"y\n"] and rx.counters["rx_lines_too_long"] == 1
    # bytes arriving while flash programming halts the CPU are lost
    got.clear()
    rx.stalls = [(3.0, 3.05)]
    rx.feed(b"p" * 60 + b"\n", 2.99, 3.01, smp_busy=False, emit=got.append)
    assert got == [] and rx.counters["rx_lines_overrun"] == 1
    # shell: lines wait while SMP is busy; beyond the 2 buffers they are lost
    sh = LineRx("shell", buf_count=2, buf_size=127)
    got.clear()
    sh.feed(b"1\n2\n3\n", 0.0, 0.001, smp_busy=True, emit=got.append)
    assert got == [] and sh.waiting == [b"1\n", b"2\n"] and sh.counters["rx_lines_no_buffer"] == 1
    sh.drain(got.append)
    assert got == [b"1\n", b"2\n"]


async def test_uart_pipelined_frames_lose_lines_while_rx_buffers_are_held(
        kit: dict[str, Path], make_sim: Any) -> None:
    # bytes reach the UART at 10 kB/s; the work handler frees an RX buffer 5 ms after the
    # line (50 byte-times): a frame starting right after a short line finds no buffer
    dev = await make_sim(serial={"rx_bytes_per_s": 10_000, "rx_work_latency_s": 0.005},
                         initial_image=kit["v1"], **FAST)
    s = RawSerial(dev.address)
    try:
        one = req(2, 0, 0, {"d": "x" * 90}, seq=1)  # 2 lines: 127 + a short tail
        assert len(lines(one)) == 2 and len(lines(one)[-1]) < 50
        burst = b"".join(b"".join(lines(req(2, 0, 0, {"d": "x" * 90}, seq=10 + i)))
                         for i in range(3))
        s.write(burst)
        got = await s.answers(3, 1.5)
        assert [g[6] for g in got] == [10, 12]  # the 2nd frame's first line found no buffer
        assert dev.counters["rx_lines_no_buffer"] >= 1
    finally:
        s.close()


async def test_uart_frame_arriving_during_flash_write_is_lost(kit: dict[str, Path],
                                                              make_sim: Any) -> None:
    # real MCU (flash_stalls_cpu): programming a 512-byte block halts the CPU; the UART
    # overruns and the next frame, pipelined behind the chunk that fills the block, is lost
    dev = await make_sim(serial={"baud": 115200}, initial_image=kit["v1"], key=kit["key"],
                         buf_size=2475, request_processing_s=0.0, flash_write_bps=5_000,
                         flash_erase_sector_s=0.0, flash_stalls_cpu=True)
    img = kit["v2"].read_bytes()
    sha = hashlib.sha256(img).digest()
    s = RawSerial(dev.address)
    try:
        s.write(b"".join(lines(req(2, 1, 1, {"image": 0, "len": len(img), "off": 0, "sha": sha,
                                             "data": img[:64]}))))
        assert len(await s.answers(1, 3)) == 1
        # chunk 64..576 fills stream_flash's 512-byte block -> ~0.1 s of programming
        a = req(2, 1, 1, {"off": 64, "data": img[64:576]}, seq=2)
        b = req(2, 0, 0, {"d": "ping"}, seq=3)
        s.write(b"".join(lines(a)) + b"".join(lines(b)))
        got = await s.answers(2, 2.0)
        assert [g[6] for g in got] == [2]
        assert dev.counters["rx_lines_overrun"] >= 1
        s.write(b"".join(lines(b)))  # sent alone, after the write: answered
        assert len(await s.answers(1, 3)) == 1
    finally:
        s.close()


# --- shell transport ---------------------------------------------------------------------------
async def test_shell_mtu_and_lines_waiting_for_the_shell_thread(kit: dict[str, Path],
                                                                 make_sim: Any) -> None:
    dev = await make_sim(serial={"transport": "shell"}, mcumgr_params_supported=True,
                         initial_image=kit["v1"],
                         request_processing_s=0.2, flash_write_bps=None,
                         flash_erase_sector_s=0.0, flash_stalls_cpu=False)
    s = RawSerial(dev.address)
    try:
        # parameters report the netbuf pool, not the shell MTU
        s.write(b"".join(lines(req(0, 0, 6, {}, seq=1))))
        (rsp,) = await s.answers(1, 3)
        assert cbor2.loads(rsp[8:]) == {"buf_size": 384, "buf_count": 4}
        big = req(2, 0, 0, {"d": "y" * 300}, seq=2)  # 314 bytes: fits the netbuf, not the MTU
        s.write(b"".join(lines(big)))
        assert await s.answers(1, 1.0) == []
        assert dev.counters["dropped_shell_mtu"] == 1
        # while SMP handles a request (200 ms) the shell thread cannot decode lines:
        # two 1-line frames wait in the 2 buffers, the third is lost
        frames = [req(2, 0, 0, {"d": f"m{i}"}, seq=10 + i) for i in range(4)]
        s.write(b"".join(lines(frames[0])))
        await dev.wait_for(lambda d: d.smp_busy())
        s.write(b"".join(b"".join(lines(f)) for f in frames[1:]))
        got = await s.answers(4, 2.0)
        assert [g[6] for g in got] == [10, 11, 12]
        assert dev.counters["rx_lines_no_buffer"] == 1
    finally:
        s.close()


# --- Renode's USART: the RX line buffers free up only when the input pauses -----------------
def _feed_lines(rx: Any, lines: list[bytes], t0: float, rate: float, gap_s: float = 0.0) -> tuple[
        list[bytes], float]:
    """Feed ``lines`` one delivery each, as the simulator's PTY endpoint does: a line's bytes
    arrive at ``rate`` bytes/s, ``gap_s`` of silence before each line after the first."""
    kept: list[bytes] = []
    t = t0
    for i, line in enumerate(lines):
        if i:
            t += gap_s
        first = t + 1 / rate
        t = first + (len(line) - 1) / rate
        rx.feed(line, first, t, smp_busy=False, emit=kept.append)
    return kept, t


def test_renode_uart_frees_its_line_buffers_only_when_the_input_pauses() -> None:
    """Found on the firmware with an upload sweep: 3-line frames written at once lose their
    last line, the same lines 20 ms apart all pass, a frame right behind another is lost."""
    from gateway.sim.serial_rx import LineRx

    line = b"x" * 122 + b"\n"
    rate = 7000.0
    rx = LineRx("uart", 2, 128, 0.001, free_when_idle=True)
    kept, t = _feed_lines(rx, [line] * 3, 0.0, rate)
    assert len(kept) == 2 and rx.counters["rx_lines_no_buffer"] == 1
    # after a pause (the device answered), the same frame paced 20 ms per line passes whole
    kept, t = _feed_lines(rx, [line] * 3, t + 0.05, rate, gap_s=0.02)
    assert len(kept) == 3
    # two 2-line frames back to back: the second finds both buffers still held
    kept, t = _feed_lines(rx, [line] * 4, t + 0.05, rate)
    assert len(kept) == 2
    # without the Renode behaviour, the work queue frees each buffer 1 ms after its line
    plain = LineRx("uart", 2, 128, 0.001)
    kept, _ = _feed_lines(plain, [line] * 5, 0.0, rate)
    assert len(kept) == 5


async def test_udp_device_that_is_down_keeps_its_port_and_stays_silent(kit: dict[str, Path],
                                                                      make_sim: Any) -> None:
    """While the device reboots its port stays bound - no other socket on the host can take it
    (with it released, another simulated device bound it and answered for this one) - and a
    request gets no answer at all, as from a board that is down, not "port unreachable"."""
    import socket

    dev = await make_sim(id="d1", udp={"host": "127.0.0.1", "port": 0}, initial_image=kit["v1"],
                         boot_time_s=1.0)
    host, port = dev.address.rsplit(":", 1)
    await dev.power_cycle(wait=False)
    for _ in range(100):
        if dev.state != "running":
            break
        await asyncio.sleep(0.01)
    assert dev.state != "running"
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OSError):
            other.bind((host, int(port)))
    finally:
        other.close()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((host, int(port)))
    try:
        sock.send(req(0, 1, 0, {}))
        with pytest.raises(TimeoutError):  # not ConnectionRefusedError
            await asyncio.wait_for(loop.sock_recv(sock, 4096), 0.3)
        await dev.wait_booted(2, timeout_s=30)
        sock.send(req(0, 1, 0, {}, seq=2))
        rsp = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3)
        assert rsp[6] == 2  # answered again on the same port after the boot
    finally:
        sock.close()
