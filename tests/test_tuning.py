"""Upload tuning (gateway/smp/tuning.py policy, gateway/smp/upload.py mechanics).

The policy is tested as pure functions/state machines; the mechanics against the scripted
img_mgmt responder of test_upload_window.py on a real UDP socket (a device with a netbuf
smaller than the link MTU, a device that holds one request at a time, slow or late answers),
the journal on a real SQLite file (a restart = a new Journal on the same state dir), and the
simulator configured like each real transport (``preset: zephyr-uart/-shell/-udp``: its drop
counters must stay at 0 once the tuning converged). No timing assertions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from smp import packet as smppacket
from test_upload_window import IMAGE, Responder, done_ok, start

from gateway.journal import Journal
from gateway.smp.session import McumgrParams, SMPSession
from gateway.smp.transport import UdpTransport
from gateway.smp.tuning import (
    BLE_CONN_INTERVAL_S,
    MIN_RTO_S,
    REPROBE_AFTER_S,
    ChunkControl,
    LinkFacts,
    LinkMemory,
    MemoryStore,
    WindowControl,
    ladder,
    learn,
    plan_upload,
    rto_floor_s,
    serial_lines,
    serial_packet_for_lines,
)

SERIAL = LinkFacts("serial", 0xFFFF - 4, 4, 127)
UDP = LinkFacts("udp", 1472)
P384 = McumgrParams(384, 4, True)
NONE = McumgrParams(384, 1, False)
FLOOR = 107
NOW = 1_000_000.0


# -- sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("line_length", [127, 128, 64])
def test_serial_line_count_is_smp_packet_encodes(line_length: int) -> None:
    for n in range(1, 2600, 7):
        assert serial_lines(n, line_length) == len(list(smppacket.encode(b"\0" * n, line_length)))
    for k in range(1, 8):
        n = serial_packet_for_lines(k, line_length)
        assert serial_lines(n, line_length) <= k < serial_lines(n + 1, line_length)


def test_ladders() -> None:
    # serial: halve the lines down to the 2-line default of the RX buffers (176 at 127)
    assert ladder(SERIAL, 380, FLOOR) == (380, 176)
    assert ladder(SERIAL, 2471, FLOOR) == (2471, 1256, 626, 266, 176)
    # datagrams: halve, snapping to the Kconfig netbuf default 384, down to the floor
    assert ladder(UDP, 1472, FLOOR) == (1472, 736, 384, 192, FLOOR)
    assert ladder(UDP, 100, FLOOR) == (100,)


# -- the plan -----------------------------------------------------------------------------
def test_plan_serial_with_params_starts_at_the_netbuf_and_window_1() -> None:
    p = plan_upload(SERIAL, P384, None, floor=FLOOR, now=NOW)
    assert (p.packet, p.window, p.grow_limit, p.window_cap) == (380, 1, 3, 3)
    assert p.ladder == (380, 176) and p.reprobe and p.source == "params"
    assert "-4 frame length+CRC" in p.reason and "serial" in p.reason
    assert p.describe().startswith(f"chunk={p.chunk} packet=380 window=1 grows_to=3 reason=")


def test_plan_udp_with_params_trusts_buf_count() -> None:
    p = plan_upload(UDP, P384, None, floor=FLOOR, now=NOW)
    assert (p.packet, p.window, p.trusted_window, p.window_cap) == (384, 3, 3, 3)


def test_plan_without_params_uses_the_kconfig_defaults() -> None:
    udp = plan_upload(UDP, NONE, None, floor=FLOOR, now=NOW)
    assert (udp.packet, udp.window, udp.grow_limit) == (1472, 1, 3)  # UDP netbufs: 2048
    ser = plan_upload(SERIAL, NONE, None, floor=FLOOR, now=NOW)
    assert (ser.packet, ser.window) == (380, 1)  # 384 - 4
    assert "no MCUmgr params" in ser.reason


def test_plan_overrides() -> None:
    p = plan_upload(SERIAL, P384, None, floor=FLOOR, now=NOW, window_override=2, chunk_cap=100)
    assert (p.window, p.window_cap, p.trusted_window, p.grow_limit) == (2, 2, 2, 2)
    assert p.chunk == 100 and "chunk_size 100" in p.reason and p.source == "override"


def test_plan_from_memory_and_when_it_is_probed_again() -> None:
    mem = LinkMemory(packet=176, window=1, packet_failed=380, window_failed=2, params="384x4",
                     link=SERIAL.signature, probed_at=NOW - 3600, uploads=3)
    p = plan_upload(SERIAL, P384, mem, floor=FLOOR, now=NOW)
    assert (p.packet, p.window, p.grow_limit, p.source, p.reprobe) == (176, 1, 1, "memory", False)
    assert "remembered" in p.reason and "window 2 lost" in p.reason
    # another firmware build (other parameters), other port settings, or a week later: re-probe
    for params, facts, now in ((McumgrParams(1024, 4, True), SERIAL, NOW), (P384, LinkFacts(
            "serial", 0xFFFF - 4, 4, 64), NOW), (P384, SERIAL, NOW + REPROBE_AFTER_S)):
        again = plan_upload(facts, params, mem, floor=FLOOR, now=now)
        assert again.reprobe and again.packet > 176 and "re-probing" in again.reason


def test_memory_record_is_validated() -> None:
    for junk in (None, [], {"packet": "x", "window": 1}, {"window": 1}, {"packet": 0, "window": 1}):
        assert LinkMemory.from_dict(junk) is None
    m = LinkMemory.from_dict({"packet": 176, "window": 2, "window_failed": "?", "extra": 1})
    assert m is not None and (m.packet, m.window, m.window_failed) == (176, 2, None)


# -- while uploading ----------------------------------------------------------------------
def test_window_grows_while_the_device_keeps_up_and_drops_back_on_the_first_loss() -> None:
    w = WindowControl(1, cap=3, trusted=1, grow_limit=3, grow_after=4)
    changes = [w.on_answer() for _ in range(4)]
    assert changes[-1] == "window 1->2 (device kept up)" and w.window == 2
    assert [w.on_answer() for _ in range(7)] == [None] * 7 and w.window == 2
    assert w.on_answer() == "window 2->3 (device kept up)" and w.window == 3
    for _ in range(50):
        w.on_answer()
    assert w.window == 3  # never above the device's capacity
    assert w.on_loss("rewind") is not None and w.window == 2 and w.failed == 3
    for _ in range(50):
        w.on_answer()
    assert w.window == 2 and w.kept_up == 2  # the probe stopped: no second loss at 3


def test_window_within_the_reported_capacity_steps_down_on_any_lost_data() -> None:
    """Zephyr's smp_bt reports buf_count 4 but drops a write silently when no netbuf is free:
    the only trace is a rewind. Any evidence of lost data at a window above 1 takes one off,
    not only ENOMEM (issue: rewinds never lowered the window, 84-162 % of the image re-sent)."""
    for kind in ("rewind", "duplicate", "gap"):
        w = WindowControl(3, cap=3, trusted=3, grow_limit=3)
        assert w.on_loss(kind) == f"window 3->2 after {kind} (data lost at window 3)"
        assert (w.window, w.failed, w.learned) == (2, 3, 2)
        for _ in range(100):
            w.on_answer()
        assert w.window == 2 and w.learned == 2  # never back to the window that lost data
        assert w.on_loss(kind) is not None and (w.window, w.failed) == (1, 2)
        assert w.on_loss(kind) is None and w.window == 1  # 1 is the floor
    w = WindowControl(3, cap=3, trusted=3, grow_limit=3)
    assert w.on_loss("timeout") is None and w.window == 3
    assert w.on_loss("timeout") == "window 3->1 after 2 timeouts"
    assert w.learned == 2  # timed out at 3 (not found spurious): 3 is not what kept up
    w = WindowControl(3, cap=3, trusted=3, grow_limit=3)
    w.on_loss("timeout")
    w.on_spurious()  # the answer came after all: nothing was lost
    assert w.learned == 3
    w = WindowControl(3, cap=3, trusted=3, grow_limit=3)
    assert w.on_loss("enomem") == "window 3->2 after ENOMEM" and w.failed == 3
    for _ in range(100):
        w.on_answer()
    assert w.window == 2  # the device said it cannot hold 3


def test_learn_never_stores_a_window_that_lost_data() -> None:
    p = plan_upload(LinkFacts("ble", 0xFFFF + 8, max_write=495), McumgrParams(2475, 4, True), None,
                    floor=FLOOR, now=NOW)
    assert p.window == 3 and p.trusted_window == 3
    c = ChunkControl(p.ladder, step_on_loss=False)
    w = WindowControl(p.window, cap=p.window_cap, trusted=p.trusted_window, grow_limit=p.grow_limit)
    w.on_loss("rewind")
    m = learn(p, c, w, None, now=NOW)
    assert (m.window, m.window_failed) == (2, 3)
    # the next upload starts at 2 and never probes 3 again
    p2 = plan_upload(p.facts, McumgrParams(2475, 4, True), m, floor=FLOOR, now=NOW + 1)
    assert (p2.window, p2.grow_limit, p2.source) == (2, 2, "memory")


def test_shell_starts_at_the_shell_mtu_within_its_two_line_buffers() -> None:
    """SMP over the Zephyr shell: CONFIG_MCUMGR_TRANSPORT_SHELL_MTU 256 and 2 line buffers of
    127 bytes; the real shell build answers 182 bytes written in one go and loses 183. The
    first chunk is no longer the 380 bytes the parameters (384 x 4) would allow."""
    shell = LinkFacts("serial", 0xFFFF - 4, 4, 127, shell=True)
    for params in (P384, NONE):
        p = plan_upload(shell, params, None, floor=FLOOR, now=NOW)
        assert p.packet == serial_packet_for_lines(2, 127) == 176 and "shell: MTU 256" in p.reason
    assert plan_upload(SERIAL, P384, None, floor=FLOOR, now=NOW).packet == 380  # uart_mcumgr
    assert shell.signature != SERIAL.signature  # memory learned as a UART is probed again
    mem = LinkMemory(packet=380, window=1, params="384x4", link=SERIAL.signature, probed_at=NOW)
    assert plan_upload(shell, P384, mem, floor=FLOOR, now=NOW).packet == 176


def test_rto_floor_follows_the_link() -> None:
    assert rto_floor_s(UDP, 1472) == MIN_RTO_S
    ble = LinkFacts("ble", 0xFFFF + 8, max_write=495)
    # 2475 bytes: 5 writes + 1 notification, two round trips of 50 ms connection events
    assert rto_floor_s(ble, 2475) == pytest.approx(2 * 6 * BLE_CONN_INTERVAL_S)
    assert rto_floor_s(LinkFacts("ble", 0xFFFF + 8, max_write=20), 2475) > 10
    uart = LinkFacts("serial", 0xFFFF - 4, 4, 127, rate=960.0)  # 9600 baud
    assert rto_floor_s(uart, 380) == pytest.approx(2 * serial_lines(380, 127) * 128 / 960.0)


def test_packet_size_steps_down_on_losses_on_serial_only() -> None:
    c = ChunkControl((380, 176), step_on_loss=True)
    assert c.on_chunk(False) is None
    for _ in range(8):  # a loss that fell out of the last 8 chunks no longer counts
        assert c.on_chunk(True) is None
    assert c.on_chunk(False) is None
    assert c.on_chunk(False) == "packet 380->176 after 2 losses in 8 chunks" and c.packet == 176
    assert c.failed == 380
    for _ in range(5):
        c.on_chunk(False)
    assert c.packet == 176  # the floor of the ladder
    # a timeout whose answer came late is not held against the size
    c = ChunkControl((380, 176), step_on_loss=True)
    c.on_chunk(False)
    c.on_spurious()
    assert c.on_chunk(False) is None and c.packet == 380
    # datagram links: the first chunk settles the size
    d = ChunkControl((1472, 736), step_on_loss=False)
    for _ in range(5):
        d.on_chunk(False)
    assert d.packet == 1472


def test_first_chunk_answer_settles_the_size() -> None:
    c = ChunkControl((1472, 736, 384, 192, FLOOR), step_on_loss=False)
    c.step_down()
    c.step_down()
    c.settle(736, unanswered=[1472])  # the 736 attempt was answered (the 384 one later)
    assert c.packet == 736 and c.failed == 1472


def test_learn_keeps_what_worked() -> None:
    p = plan_upload(SERIAL, P384, None, floor=FLOOR, now=NOW)
    c = ChunkControl(p.ladder, step_on_loss=True)
    c.step_down()
    c.settle(176, unanswered=[380])  # the 380-byte first chunk got no answer, the 176 one did
    w = WindowControl(1, cap=3, trusted=1, grow_limit=3, grow_after=1)
    w.on_answer()
    w.on_loss("rewind")
    m = learn(p, c, w, None, now=NOW)
    assert (m.packet, m.window, m.packet_failed, m.window_failed) == (176, 1, 380, 2)
    assert (m.params, m.link, m.uploads, m.probed_at) == ("384x4", SERIAL.signature, 1, NOW)
    assert LinkMemory.from_dict(m.to_dict()) == m


# -- mechanics: a real socket, a scripted device, the journal --------------------------------
async def _upload(r: Responder, store: Any, **kw: Any) -> Any:
    async with SMPSession(UdpTransport("127.0.0.1", r.port), device_id="dev-1", timeout_s=1.0) as s:
        return await s.upload(IMAGE, store=store, **kw)


async def test_unanswered_first_chunk_is_retried_smaller_and_remembered_after_a_restart(
        tmp_path: Path) -> None:
    # stock-like device without parameters whose netbuf (1024) is below the UDP MTU
    r = await start(Responder(params_supported=False, buf_size=1024, enforce_buf_size=True))
    journal = Journal(tmp_path / "state" / "journal.sqlite")
    stats = await _upload(r, journal)
    assert done_ok(r, IMAGE)
    assert stats.probes == [1472] and r.dropped_oversize >= 1
    assert stats.packet == 736 and "no answer" not in stats.plan
    journal.close()

    # the gateway restarts: a new Journal on the same state dir, a new session
    journal = Journal(tmp_path / "state" / "journal.sqlite")
    mem = LinkMemory.from_dict(journal.link_tuning("dev-1"))
    assert mem is not None and mem.packet == 736 and mem.packet_failed == 1472
    dropped, seen = r.dropped_oversize, len(r.log)
    stats = await _upload(r, journal)
    assert done_ok(r, IMAGE)
    assert r.dropped_oversize == dropped and stats.probes == []  # no failed probe this time
    assert stats.retransmits == 0 and 'reason="remembered' in stats.plan
    assert all(q.data_len <= 736 for q in r.log[seen:])
    assert LinkMemory.from_dict(journal.link_tuning("dev-1")).uploads == 2  # type: ignore[union-attr]
    journal.close()


async def test_window_probe_stops_at_the_first_loss_and_is_not_repeated() -> None:
    # a device without parameters that holds one request at a time: a second one is dropped
    r = await start(Responder(params_supported=False, capacity=1, processing_s=0.002))
    store = MemoryStore()
    stats = await _upload(r, store)
    assert done_ok(r, IMAGE)
    assert r.dropped_busy >= 1
    grew = [f for f in stats.fallbacks if "1->2" in f]
    back = [f for f in stats.fallbacks if "2->1" in f]
    assert len(grew) == 1 and len(back) == 1  # one probe, dropped back once, never again
    mem = LinkMemory.from_dict(store.link_tuning("dev-1"))
    assert mem is not None and (mem.window, mem.window_failed) == (1, 2)

    busy = r.dropped_busy
    stats = await _upload(r, store)
    assert done_ok(r, IMAGE)
    assert r.dropped_busy == busy and stats.window_max == 1 and stats.rewinds == 0


async def test_silent_drops_below_the_reported_capacity_lower_the_window_and_are_not_learned(
        ) -> None:
    """Like smp_bt on Zephyr 3.4: parameters say buf_count 4 (window 3), the device holds only
    2 requests and drops a third silently; the gateway sees only rewinds. The window steps down
    at the first one, 3 is remembered as failed, and the next upload re-sends nothing."""
    r = await start(Responder(buf_count=4, capacity=2, processing_s=0.003))
    store = MemoryStore()
    stats = await _upload(r, store)
    assert done_ok(r, IMAGE)
    assert stats.window == 3 and stats.window_final == 2 and r.dropped_busy >= 1
    mem = LinkMemory.from_dict(store.link_tuning("dev-1"))
    assert mem is not None and (mem.window, mem.window_failed) == (2, 3)
    assert stats.retransmitted_ratio < 0.5  # the old rule: 3 kept, most of the image re-sent

    busy = r.dropped_busy
    stats = await _upload(r, store)
    assert done_ok(r, IMAGE)
    assert stats.window_max == 2 and r.dropped_busy == busy and stats.retransmitted_bytes == 0


async def test_a_late_answer_is_a_spurious_timeout_not_a_loss() -> None:
    def slow(q: Any) -> float:  # one chunk takes the device beyond the RTO (>= 0.2 s)
        return 0.35 if q.n == 3 else 0.02

    # requests handled in order, 20 ms each: the re-sent chunk waits behind the slow one,
    # whose answer therefore comes first, late; the upload is still running then
    r = await start(Responder(buf_count=2, capacity=2, processing=slow))
    stats = await _upload(r, None)
    assert done_ok(r, IMAGE)
    assert stats.retransmits == 1 and stats.spurious == 1


# -- the simulator configured like each real transport (gateway/sim/presets.py) -------------
DROPS = ("rx_lines_no_buffer", "rx_lines_overrun", "rx_lines_too_long", "bad_serial_frames",
         "dropped_shell_mtu", "dropped_oversize", "dropped_netbuf", "enomem", "lost_requests")


@pytest.fixture(scope="module")
def preset_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from gateway.devkit import make_key, sign_image

    root = tmp_path_factory.mktemp("preset-images")
    key = make_key(root / "k.pem")
    v1 = sign_image(root / "v1.bin", version="1.0.0", key=key, size=8000, slot_size=0x40000)
    v2 = sign_image(root / "v2.bin", version="2.0.0", key=key, size=12000, slot_size=0x40000)
    return {"v1": Path(v1), "v2": Path(v2).read_bytes()}


async def _converge(tmp_path: Path, preset: str, images: dict[str, Any], shell: bool = False,
                    **overrides: Any) -> tuple[list[Any], list[dict[str, int]], Any]:
    """Upload until what the gateway learned stops changing (at most 4 uploads): the stats and
    the device's drop counters of each upload, and the final memory."""
    from gateway.mcuboot import parse_image
    from gateway.sim import SimConfig, SimDeviceConfig, Simulator
    from gateway.smp.transport import SerialTransport
    from gateway.smp.tuning import same_knowledge

    want = parse_image(images["v2"]).hash
    dev_cfg: dict[str, Any] = {"id": "d", "preset": preset, "initial_image": str(images["v1"]),
                               "boot_time_s": 0.05, **overrides}
    if preset == "zephyr-udp":
        dev_cfg["udp"] = {"host": "127.0.0.1", "port": 0}
    if preset == "zephyr-ble":
        dev_cfg["ble"] = {"hci": f"link:tuning-{tmp_path.name}"}
    sim = Simulator(SimConfig(state_dir=tmp_path / "sim",
                              devices=[SimDeviceConfig.model_validate(dev_cfg)]))
    store = MemoryStore()
    all_stats: list[Any] = []
    drops: list[dict[str, int]] = []
    async with sim:
        dev = sim.devices["d"]
        ep = sim.endpoints()["d"]
        last: LinkMemory | None = None
        for _ in range(4):
            before = {k: dev.counters[k] for k in DROPS}
            tr: Any
            if ep["transport"] == "ble":
                from gateway.config import BleTransport
                from gateway.smp.ble import BleLink

                tr = BleLink(BleTransport.model_validate(
                    {"kind": "ble", "name": ep["name"], "backend": "bumble", "hci": ep["hci"]}))
            elif ep["transport"] == "udp":
                tr = UdpTransport(ep["host"], ep["port"])
            else:
                tr = SerialTransport(ep["address"], shell=shell)
            async with SMPSession(tr, device_id="d", timeout_s=3.0) as s:
                st = await s.upload(images["v2"], store=store)
                states = await s.image_state()
            assert any(x.slot == 1 and x.hash == want for x in states)
            all_stats.append(st)
            drops.append({k: dev.counters[k] - v for k, v in before.items() if dev.counters[k] != v})
            mem = LinkMemory.from_dict(store.link_tuning("d"))
            assert mem is not None
            if last is not None and mem.packet == last.packet and mem.window == last.window:
                break
            last = mem
        assert same_knowledge(last, mem)  # converged
    return all_stats, drops, mem


@pytest.mark.timeout(120)
async def test_uart_preset_converges_to_settings_without_drops(
        tmp_path: Path, preset_images: dict[str, Any]) -> None:
    """Stock smp_svr on a UART (2 RX line buffers, the CPU halted while flash is written):
    once tuned, an upload loses no line and re-sends (almost) nothing."""
    stats, drops, mem = await _converge(tmp_path, "zephyr-uart", preset_images)
    assert stats[0].plan.startswith("chunk=354 packet=380 window=1")  # no params: Kconfig 384
    assert drops[-1] == {}, (drops, stats[-1])
    # at most one chunk sent twice (a timeout on a loaded machine, the answer only late)
    assert stats[-1].retransmitted_bytes <= 356 and stats[-1].probes == []
    assert stats[-1].window_max == mem.window  # no probing once converged


@pytest.mark.timeout(120)
async def test_shell_preset_first_chunk_above_the_shell_mtu_is_retried_smaller(
        tmp_path: Path, preset_images: dict[str, Any]) -> None:
    """overlay-shell.conf: the shell's MTU (256) is below the netbuf: a 380-byte first chunk
    gets no answer; the upload goes on with 2-line packets and remembers them."""
    stats, drops, mem = await _converge(tmp_path, "zephyr-shell", preset_images)
    assert stats[0].probes == [380] and drops[0].get("dropped_shell_mtu", 0) >= 1
    assert mem.packet == 176 and mem.packet_failed == 380
    assert drops[-1] == {} and stats[-1].probes == [] and stats[-1].retransmitted_bytes <= 154


@pytest.mark.timeout(120)
async def test_shell_link_starts_at_the_shell_mtu_without_a_lost_first_chunk(
        tmp_path: Path, preset_images: dict[str, Any]) -> None:
    """``serial: {shell: true}``: the first chunk already fits the shell (no 380-byte probe,
    nothing dropped by the device from the first upload on)."""
    stats, drops, mem = await _converge(tmp_path, "zephyr-shell", preset_images, shell=True)
    assert stats[0].probes == [] and stats[0].plan.startswith("chunk=151 packet=176")
    assert "dropped_shell_mtu" not in drops[0] and mem.packet == 176
    assert mem.packet_failed is None and drops[-1] == {}


@pytest.mark.timeout(120)
async def test_ble_preset_drops_writes_silently_and_the_window_settles_at_2(
        tmp_path: Path, preset_images: dict[str, Any]) -> None:
    """``zephyr-ble`` (smp_bt on Zephyr 3.4: parameters 2475 x 4, reassembly holds a netbuf):
    the upload starts at window 3, the device drops a write silently (no ENOMEM), the gateway
    sees a rewind, steps down to 2 and remembers 3 as failed; the next upload loses nothing."""
    stats, drops, mem = await _converge(tmp_path, "zephyr-ble", preset_images)
    assert stats[0].window == 3 and drops[0].get("dropped_netbuf", 0) >= 1
    assert drops[0].get("enomem", 0) == 0 and stats[0].rewinds >= 1
    assert (mem.window, mem.window_failed) == (2, 3)
    assert drops[-1] == {} and stats[-1].window_max == 2 and stats[-1].retransmitted_bytes == 0


@pytest.mark.timeout(120)
async def test_udp_preset_finds_the_netbuf_and_the_window(
        tmp_path: Path, preset_images: dict[str, Any]) -> None:
    """overlay-udp.conf without parameters, built with 384-byte netbufs (prj.conf): datagrams
    above the netbuf are lost, so the size comes down the ladder; the window grows to the
    pool's capacity while the device keeps up."""
    stats, drops, mem = await _converge(tmp_path, "zephyr-udp", preset_images,
                                        buf_size=384, buf_count=4)
    assert stats[0].probes == [1472, 736] and drops[0].get("dropped_oversize", 0) >= 2
    assert mem.packet == 384
    assert drops[-1] == {} and stats[-1].probes == [] and stats[-1].retransmitted_bytes <= 360


async def test_timed_out_requests_still_count_against_the_device_buffers() -> None:
    """A device that holds 3 requests (buf_count 4) and takes 0.5 s over one of them: the
    window's requests all time out, but the device still queues them; re-sending them all
    would overflow it. Only one goes out until an answer settles the others."""
    def slow(q: Any) -> float:
        return 0.5 if q.n == 4 else 0.002

    r = await start(Responder(buf_count=4, capacity=3, processing=slow))
    stats = await _upload(r, None)
    assert done_ok(r, IMAGE)
    assert stats.retransmits >= 1 and stats.spurious >= 1
    assert r.dropped_busy <= 1  # without the rule: every re-sent request of the window


async def test_a_failed_upload_keeps_what_its_first_chunk_taught() -> None:
    """The link dies after the size was found: the next attempt (the engine re-opens the link
    and resumes) starts at that size, without the failed probe; nothing else is learned."""
    from gateway.smp.errors import UploadError

    r = await start(Responder(params_supported=False, buf_size=1024, enforce_buf_size=True,
                              drop_request=lambda q: q.n >= 6))
    store = MemoryStore()
    with pytest.raises(UploadError, match="no progress"):
        await _upload(r, store, max_stalls=2)
    mem = LinkMemory.from_dict(store.link_tuning("dev-1"))
    assert mem is not None and (mem.packet, mem.packet_failed, mem.window) == (736, 1472, 1)

    r.drop_request = lambda q: False
    dropped = r.dropped_oversize
    stats = await _upload(r, store)
    assert done_ok(r, IMAGE) and stats.probes == [] and r.dropped_oversize == dropped
    assert stats.start_offset > 0  # resumed where the failed attempt left off


async def test_rto_follows_a_device_whose_flash_writes_take_hundreds_of_ms() -> None:
    """Each chunk takes the device 250 ms (a slow flash write; the session's small requests
    answered at once): the RTO starts at RFC 6298's 1 s, then follows the measured round trips,
    so nothing is sent twice."""
    r = await start(Responder(buf_count=2, capacity=2, processing_s=0.25))
    stats = await _upload(r, None)
    assert done_ok(r, IMAGE)
    assert stats.retransmits == 0 and stats.spurious == 0 and r.wrong_offset_answers == 0
    assert 0.25 < stats.rto_s <= 1.0


@pytest.mark.timeout(120)
async def test_stock_udp_preset_uses_the_whole_datagram(
        tmp_path: Path, preset_images: dict[str, Any]) -> None:
    """The stock UDP sample (Kconfig's 2048 x 2 netbufs, parameters ENOTSUP): the gateway
    assumes the UDP transport's defaults, so its first chunk fills a 1472-byte datagram and is
    answered; a second request in flight finds no free netbuf, so the window stays at 1."""
    stats, drops, mem = await _converge(tmp_path, "zephyr-udp", preset_images)
    assert stats[0].probes == [] and stats[0].plan.startswith("chunk=1446 packet=1472")
    assert mem.packet == 1472 and mem.window == 1
    assert drops[-1] == {} and stats[-1].probes == [] and stats[-1].retransmitted_bytes <= 1448
