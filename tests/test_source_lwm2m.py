"""The LwM2M source against the real Eclipse Wakaama server, with simulated SMP devices.

Wakaama's ``lwm2mserver`` (``<shared>/lwm2m``) drives the gateway's Firmware Update object
(/5) the way an operator would: Package URI (PULL over a loopback HTTP server) or Package by
Block1 (PUSH), Update, observations of State and Update Result. The gateway runs as the daemon
(``run_forever``), the devices are simulator devices with imgtool-signed images; every wait
awaits an event with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
import pytest
import yaml
from aiocoap.optiontypes import BlockOption
from aiohttp import web
from daemon_support import GatewayProcess, journal_rows, serving
from fleet_servers.common import FileStore, serve
from lwm2m_server import Wakaama, free_udp_port, tlv_int, wakaama_binary

from gateway import devkit
from gateway.artifacts.bundle import BundleEntry, write_bundle
from gateway.cancel import CANCELED
from gateway.config import GatewayConfig, parse_config
from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator
from gateway.sources.base import FetchError, Offer, UpdateResult
from gateway.sources.lwm2m import Lwm2mSource, codec
from gateway.sources.lwm2m.endpoint import Endpoint
from gateway.sources.settings import Lwm2mSourceConfig

pytestmark = pytest.mark.timeout(240)

STATE, RESULT, PKGVER, FWVER = "/5/0/3", "/5/0/5", "/5/0/7", "/3/0/3"


@pytest.fixture
async def server() -> AsyncIterator[Wakaama]:
    wakaama_binary()  # skip (or fail in CI) with a clear message when the server is absent
    async with Wakaama() as srv:
        yield srv


def lwm2m_cfg(bench: Any, sim: Simulator, srv: Wakaama, top: dict[str, Any] | None = None,
              **source: Any) -> GatewayConfig:
    data = {**bench.gateway_dict(sim), **(top or {})}
    data["source"] = {"kind": "lwm2m", "server": srv.url, "bind_host": "127.0.0.1",
                      "lifetime_s": 60, "poll_interval_s": 30, "request_timeout_s": 20,
                      **source}
    return parse_config(data, bench.root / "gateway.yaml")


def daemon(cfg: GatewayConfig) -> contextlib.AbstractAsyncContextManager[Gateway]:
    return serving(Gateway(cfg), tolerant=True)


def slot1(dev: Any) -> Any:
    return next((s for s in dev.server.state_images() if s.slot == 1), None)


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


async def observe_fw(srv: Wakaama, c: int) -> None:
    for uri in (STATE, RESULT, FWVER):
        await srv.observe(c, uri)


async def until_downloaded(srv: Wakaama, c: int, since: int) -> None:
    """State 2, or a refusal (State 0 with a Result) - whichever the gateway decides."""
    await srv.wait(lambda e: e.kind == "NOTIFY" and e.client == c and (
        (e.get("uri") == STATE and tlv_int(e.payload) == 2)
        or (e.get("uri") == RESULT and tlv_int(e.payload) != 0)), 90, since)


async def test_pull_over_http_then_update(bench_factory, server: Wakaama) -> None:
    bench = bench_factory(udp=1, serial=0)
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    async with serve(app) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        url = base + fs.add("app-2.0.0.bin", bench.images["2.0.0"].read_bytes())
        async with daemon(lwm2m_cfg(bench, sim, server)):
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/1", url)).code == "2.04"
            await until_downloaded(server, c, m)
            assert server.values(c, STATE)[-1] == 2 and server.values(c, RESULT)[-1] == 0
            # Downloaded = every pre-flight check passed, and not a byte went to the device
            assert dev.counters["upload_bytes_received"] == 0 and dev.counters["resets"] == 0
            assert (await server.read(c, PKGVER)).payload.endswith(b"2.0.0")
            assert (await server.exec(c, "/5/0/2")).code == "2.04"
            await server.notified(c, RESULT, 1, 120, m)
            await server.wait(lambda e: e.kind == "NOTIFY" and e.get("uri") == FWVER
                              and e.payload.endswith(b"2.0.0"), 30, m)
        assert active(dev) == ("2.0.0", True)
        states = server.values(c, STATE)
        assert states[-4:] == [1, 2, 3, 0], states  # Downloading, Downloaded, Updating, Idle
        assert server.values(c, RESULT)[-1] == 1


async def test_push_block1_then_update_and_restart_keeps_result(bench_factory,
                                                                 server: Wakaama) -> None:
    bench = bench_factory(udp=1, serial=0)  # ~100 KB images: ~100 Block1 blocks of 1 KiB
    img = bench.images["2.0.0"]
    assert img.stat().st_size > 90_000
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        cfg = lwm2m_cfg(bench, sim, server)
        async with daemon(cfg):
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.exec(c, "/5/0/2")).code == "4.05"  # Update needs State 2
            assert (await server.write(c, "/5/0/0", f"@{img}", within=120)).code == "2.04"
            await until_downloaded(server, c, m)
            assert server.values(c, STATE)[-1] == 2
            assert dev.counters["upload_bytes_received"] == 0
            assert (await server.exec(c, "/5/0/2")).code == "2.04"
            await server.notified(c, RESULT, 1, 120, m)
            await server.notified(c, STATE, 0, 10, m)
        assert active(dev) == ("2.0.0", True)
        # the pushed package was streamed to a file and is gone once done
        assert not list((cfg.state_dir / "lwm2m" / "packages").glob("*.bin"))
        # a restarted gateway registers again and answers the same State / Result
        m = server.mark()
        async with daemon(cfg):
            c2 = await server.registered("udp-1", since=m)
            assert c2 == c
            assert tlv_int((await server.read(c, RESULT)).payload) == 1
            assert tlv_int((await server.read(c, STATE)).payload) == 0


async def push_and_expect_refusal(bench: Any, server: Wakaama, package: Path,
                                  want_result: int) -> None:
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        async with daemon(lwm2m_cfg(bench, sim, server)) as gw:
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/0", f"@{package}", within=120)).code == "2.04"
            await server.notified(c, RESULT, want_result, 90, m)
            assert server.values(c, STATE)[-1] == 0
            assert 2 not in server.values(c, STATE)  # never Downloaded
            assert (await server.exec(c, "/5/0/2")).code == "4.05"
            assert dev.counters["upload_bytes_received"] == 0 and dev.counters["resets"] == 0
            assert active(dev) == ("1.0.0", True)
            assert gw.journal.get("udp-1").outcome == "refused"


async def test_untrusted_signature_is_result_5_and_nothing_sent(bench_factory,
                                                                server: Wakaama) -> None:
    bench = bench_factory(udp=1, serial=0)
    rogue = devkit.make_key(bench.root / "rogue.pem")
    img = devkit.sign_image(bench.root / "rogue-3.0.0.bin", version="3.0.0", key=rogue,
                            size=40_000)
    await push_and_expect_refusal(bench, server, img, 5)


async def test_wrong_hardware_is_result_6(bench_factory, server: Wakaama) -> None:
    bench = bench_factory(udp=1, serial=0)
    image = bench.images["2.0.0"].read_bytes()
    data = write_bundle([BundleEntry(name="app.bin", image=0, slot=None, data=image,
                                     hardware="other_board")])
    pkg = bench.root / "other-board.zip"
    pkg.write_bytes(data)
    await push_and_expect_refusal(bench, server, pkg, 6)


async def test_empty_package_uri_cancels_in_downloaded(bench_factory, server: Wakaama) -> None:
    bench = bench_factory(udp=1, serial=0)
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        cfg = lwm2m_cfg(bench, sim, server)
        async with daemon(cfg) as gw:
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/0", f"@{bench.images['2.0.0']}", 120)).code == "2.04"
            await until_downloaded(server, c, m)
            assert server.values(c, STATE)[-1] == 2
            # an empty Package URI (Wakaama sends it in the client's format: TLV c0 01)
            assert (await server.write(c, "/5/0/1", '[{"bn":"/5/0/1","vs":""}]')).code == "2.04"
            await server.notified(c, STATE, 0, 10, m)
            assert server.values(c, RESULT)[-1] == 0
            assert (await server.exec(c, "/5/0/2")).code == "4.05"
            # the same cancel path as every source: journalled as an intent, then finished
            await wait_until(lambda: "intent-cancel-done" in cancel_events(gw, "udp-1"), 20,
                             "the cancel's intent finished")
            assert cancel_events(gw, "udp-1")[0] == "intent-cancel"
        assert dev.counters["upload_bytes_received"] == 0 and active(dev) == ("1.0.0", True)
        assert not list((cfg.state_dir / "lwm2m" / "packages").glob("*.bin"))


async def test_empty_package_uri_while_updating_before_the_mark_takes_it_back(
        bench_factory, server: Wakaama) -> None:
    """A cancel (empty Package URI) in State 3 while the image is still being uploaded (before
    the test mark): State 0 Result 0 at once, the cancel acted on at once (not a poll period
    later: ``poll_interval_s`` is 30 s here), slot 1 erased, the device never reset and still
    on its confirmed image."""
    bench = bench_factory(udp=1, serial=0, image_size=96 * 1024,
                          device_kw={"link": {"bandwidth_bps": 40_000}})  # ~20 s of upload
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        async with daemon(lwm2m_cfg(bench, sim, server)) as gw:
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/0", f"@{bench.images['2.0.0']}", 120)).code == "2.04"
            await until_downloaded(server, c, m)
            assert (await server.exec(c, "/5/0/2")).code == "2.04"
            await server.notified(c, STATE, 3, 10, m)
            await dev.wait_for(lambda d: d.counters["upload_bytes_received"] > 4000, 60)
            t0 = time.monotonic()
            assert (await server.write(c, "/5/0/1", '[{"bn":"/5/0/1","vs":""}]')).code == "2.04"
            await server.notified(c, STATE, 0, 10, m)
            await dev.wait_for(lambda d: gw.journal.get("udp-1").outcome is not None, 60)
            assert gw.journal.get("udp-1").outcome == CANCELED
            assert time.monotonic() - t0 < 10  # not the 30 s poll period
            assert dev.counters["upload_bytes_received"] < 90 * 1024  # stopped mid-upload
            assert server.values(c, RESULT)[-1] == 0
            assert (await server.exec(c, "/5/0/2")).code == "4.05"
        assert active(dev) == ("1.0.0", True)
        assert slot1(dev) is None and dev.image_info(1) is None  # erased
        assert dev.counters["resets"] == 0


async def test_reboot_goes_through_the_maintenance_window_gate(bench_factory,
                                                                server: Wakaama) -> None:
    """Reboot (/3/0/4) is an SMP reset of the device, only inside a maintenance window (c):
    outside, 4.03 with the reason and the device untouched; inside, 2.04 once the device
    acknowledged the reset, and it reboots."""
    never = {"cron": "0 0 1 1 *", "duration_s": 60, "timezone": "UTC"}  # 1 January 00:00
    always = {"cron": "* * * * *", "duration_s": 3600, "timezone": "UTC"}
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        boots = dev.boots
        async with daemon(lwm2m_cfg(bench, sim, server, {"maintenance_windows": {"w": never}})):
            c = await server.registered("udp-1")
            r = await server.exec(c, "/3/0/4")
            assert r.code == "4.03" and b"maintenance window" in r.payload, r
            assert dev.counters["resets"] == 0 and dev.boots == boots
        m = server.mark()
        async with daemon(lwm2m_cfg(bench, sim, server, {"maintenance_windows": {"w": always}})):
            c = await server.registered("udp-1", since=m)
            assert (await server.exec(c, "/3/0/4")).code == "2.04"
            await dev.wait_booted(boots + 1, 20)
            assert dev.counters["resets"] == 1
        assert active(dev) == ("1.0.0", True)


async def test_crashing_image_is_result_8(bench_factory, server: Wakaama) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=32 * 1024,
                          device_kw={"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.2})
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        async with daemon(lwm2m_cfg(bench, sim, server)):
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/0", f"@{bench.images['2.0.0']}", 120)).code == "2.04"
            await until_downloaded(server, c, m)
            assert (await server.exec(c, "/5/0/2")).code == "2.04"
            await server.notified(c, RESULT, 8, 120, m)
            assert server.values(c, STATE)[-1] == 0 and 3 in server.values(c, STATE)
        assert active(dev) == ("1.0.0", True)
        assert dev.counters["resets"] >= 1  # it was test-booted, crashed, and MCUboot reverted


def test_codec_round_trips_and_refuses_garbage() -> None:
    items = [codec.Item(3, 2), codec.Item(6, "fw.bin"), codec.Item(8, 0, 0), codec.Item(8, 2, 1)]
    data = codec.tlv_resources(items)
    back = codec.tlv_decode(data, instance_level=True)
    assert [(i.rid, i.riid) for i in back] == [(3, None), (6, None), (8, 0), (8, 1)]
    assert codec.from_raw("int", back[0].value) == 2  # type: ignore[arg-type]
    big = codec.tlv_resources([codec.Item(0, b"x" * 70_000)])
    assert codec.tlv_decode(big, False)[0].value == b"x" * 70_000
    for bad in (b"\xc8\x00\xff", b"\xc1", b"\x38\x00\x05\x00"):
        with pytest.raises(ValueError):
            codec.tlv_decode(bad, False)
    recs = codec.senml_decode(codec.senml("/5/0/", [("3", 1), ("6", "a")]), cbor=False)
    assert recs == [("/5/0/3", 1), ("/5/0/6", "a")]
    recs = codec.senml_decode(codec.senml("/5/0/", [("3", 1), ("7", "b")], cbor=True), cbor=True)
    assert recs == [("/5/0/3", 1), ("/5/0/7", "b")]
    with pytest.raises(ValueError):
        codec.senml_decode(b"[" * 10 + b"{", cbor=False)


async def test_server_restart_mid_update_re_registers(bench_factory, server: Wakaama) -> None:
    """The server forgets the client (restart) while the package waits in Downloaded: the
    next registration update is answered 4.04, the endpoint registers again, and the new
    server can read State 2 and execute the Update."""
    bench = bench_factory(udp=1, serial=0, image_size=32 * 1024)
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        async with daemon(lwm2m_cfg(bench, sim, server, lifetime_s=6)) as gw:
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/0", f"@{bench.images['2.0.0']}", 120)).code == "2.04"
            await until_downloaded(server, c, m)
            ep = gw.source.endpoint("udp-1")  # type: ignore[attr-defined]
            before = ep.registrations
            m = server.mark()
            await server.stop()
            await server.start()  # same port, no clients
            c = (await server.wait(lambda e: e.kind == "REGISTERED" and e.get("ep") == "udp-1",
                                   30, m)).client
            # the server prints REGISTERED before its 2.01 reaches the endpoint (which
            # cleared ``registered`` when the update got 4.04, before registering again)
            await asyncio.wait_for(ep.registered.wait(), 10)
            assert ep.registrations == before + 1
            r = await server.read(c, STATE)
            assert r.code == "2.05", server.hexdump(6000)
            assert tlv_int(r.payload) == 2
            await server.observe(c, RESULT)
            m = server.mark()
            assert (await server.exec(c, "/5/0/2")).code == "2.04"
            await server.notified(c, RESULT, 1, 120, m)
        assert active(dev) == ("2.0.0", True)


async def test_pull_over_coap_blockwise(bench_factory, server: Wakaama) -> None:
    import aiocoap
    import aiocoap.resource as resource

    bench = bench_factory(udp=1, serial=0)
    image = bench.images["2.0.0"].read_bytes()

    class Fw(resource.Resource):
        gets = 0

        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            Fw.gets += 1
            return aiocoap.Message(payload=image)  # aiocoap answers it Block2 by Block2

    site = resource.Site()
    site.add_resource(["fw", "app.bin"], Fw())
    port = free_udp_port()
    ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port),
                                                      transports=["udp6"])
    try:
        async with Simulator(bench.sim_cfg) as sim:
            dev = sim.devices["udp-1"]
            async with daemon(lwm2m_cfg(bench, sim, server)):
                c = await server.registered("udp-1")
                await observe_fw(server, c)
                m = server.mark()
                uri = f"coap://127.0.0.1:{port}/fw/app.bin"
                assert (await server.write(c, "/5/0/1", uri)).code == "2.04"
                await until_downloaded(server, c, m)
                assert server.values(c, STATE)[-1] == 2, server.values(c, RESULT)
                assert (await server.exec(c, "/5/0/2")).code == "2.04"
                await server.notified(c, RESULT, 1, 120, m)
            assert active(dev) == ("2.0.0", True)
            assert Fw.gets >= 1  # (aiocoap renders once and serves the ~100 Block2 blocks)
    finally:
        await ctx.shutdown()



async def test_twenty_endpoints_by_push(bench_factory, server: Wakaama) -> None:
    """A scaled-down version of the 200-endpoint run: 20 endpoints (20 UDP sockets), each
    device's package pushed by Block1, all updated; wall time, CPU and peak RSS printed."""
    import resource as rusage

    n = 20
    bench = bench_factory(udp=n, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"]
    async with Simulator(bench.sim_cfg) as sim:
        cfg = lwm2m_cfg(bench, sim, server)
        t0, cpu0 = time.monotonic(), time.process_time()
        async with daemon(cfg):
            ids = sorted(sim.devices)
            clients = {d: await server.registered(d, within=60) for d in ids}
            assert len(set(clients.values())) == n  # one client (source address) each
            m = server.mark()
            for d in ids:
                await server.observe(clients[d], RESULT)
                await server.observe(clients[d], STATE)
                await server.cmd(f"write {clients[d]} /5/0/0 @{img}")
            for d in ids:
                await until_downloaded(server, clients[d], m)
            for d in ids:
                assert (await server.exec(clients[d], "/5/0/2")).code == "2.04"
            for d in ids:
                await server.notified(clients[d], RESULT, 1, 180, m)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        rss_mb = rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss / 1024
        assert all(active(sim.devices[d]) == ("2.0.0", True) for d in ids)
        print(f"\nLwM2M PUSH x{n}: {wall:.1f}s wall, {cpu:.1f}s CPU (gateway + simulator "
              f"process), peak RSS {rss_mb:.0f} MB")


def _msg(mtype: Any, code: Any, mid: int, token: bytes = b"", **opts: Any) -> aiocoap.Message:
    m = aiocoap.Message(code=code, **opts)
    m.mtype, m.mid, m.token = mtype, mid, token
    return m


class _RawServer(asyncio.DatagramProtocol):
    """The server side of CoAP on a real UDP socket, message by message (to choose the
    Message IDs a restarted server sends, which Wakaama picks itself)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[aiocoap.Message, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(Exception):
            self.inbox.put_nowait((aiocoap.Message.decode(data), addr))

    def send(self, msg: aiocoap.Message, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(msg.encode(), addr)

    async def expect(self, pred: Any, within: float = 20.0) -> tuple[aiocoap.Message, Any]:
        async def find() -> tuple[aiocoap.Message, Any]:
            while True:
                msg, addr = await self.inbox.get()
                if msg.mtype == aiocoap.CON and not pred(msg):
                    # anything else the client asks (a notification, ...) gets an empty ACK
                    self.send(_msg(aiocoap.ACK, aiocoap.EMPTY, msg.mid), addr)
                    continue
                if pred(msg):
                    return msg, addr
        return await asyncio.wait_for(find(), within)

    def answer(self, req: aiocoap.Message, addr: Any, code: Any, **opts: Any) -> None:
        self.send(_msg(aiocoap.ACK, code, req.mid, req.token, **opts), addr)

    async def get(self, addr: Any, mid: int, token: bytes) -> aiocoap.Message:
        self.send(_msg(aiocoap.CON, aiocoap.GET, mid, token, uri_path=("5", "0", "3")), addr)
        msg, _ = await self.expect(lambda m: m.mtype == aiocoap.ACK and m.mid == mid)
        return msg


async def test_restarted_server_reusing_a_message_id_gets_an_answer_not_a_replay(
        tmp_path: Path) -> None:
    """A restarted server may start its Message IDs where its predecessor did (Wakaama often
    does). After the re-registration its first Read must get an answer with its own token and
    the current State - not the message layer's replay of what the old session was told
    (that made ``test_server_restart_mid_update_re_registers`` fail 2 runs in 3)."""
    loop = asyncio.get_running_loop()
    transport, srv = await loop.create_datagram_endpoint(_RawServer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    cfg = Lwm2mSourceConfig(server=f"coap://127.0.0.1:{port}", bind_host="127.0.0.1",
                            lifetime_s=5, request_timeout_s=5)
    ep = Endpoint(cfg, "dev-1", "dev-1", tmp_path, on_change=lambda *_: None)
    await ep.start()
    try:
        def register(m: aiocoap.Message) -> bool:
            return m.code == aiocoap.POST and m.opt.uri_path == ("rd",)
        req, addr = await srv.expect(register)
        srv.answer(req, addr, aiocoap.CREATED, location_path=("rd", "0"))
        old = await srv.get(addr, 0x1FAD, b"old1")
        assert old.token == b"old1" and tlv_int(old.payload) == 0
        ep.set(state=2, phase="wait")  # State changes: Downloaded
        # the server restarts: it answers the registration update 4.04, the client registers
        req, addr = await srv.expect(lambda m: m.code == aiocoap.POST
                                     and m.opt.uri_path == ("rd", "0"))
        srv.answer(req, addr, aiocoap.NOT_FOUND)
        req, addr2 = await srv.expect(register)
        srv.answer(req, addr2, aiocoap.CREATED, location_path=("rd", "0"))
        new = await srv.get(addr2, 0x1FAD, b"new1")  # the same Message ID as before
        assert new.token == b"new1", (new, new.payload)
        assert new.code == aiocoap.CONTENT and tlv_int(new.payload) == 2
        assert ep.registrations == 2
    finally:
        await ep.close(deregister=False)
        transport.close()


async def wait_until(pred: Any, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling the in-process daemon's journal, not a fixed wait


def cancel_events(gw: Gateway, dev_id: str) -> list[str]:
    return [e[2] for e in gw.journal.events(dev_id, steps=("intent-cancel", "intent-cancel-ack",
                                                           "intent-cancel-done"))]


async def test_empty_package_uri_cancels_a_slow_pull_in_downloading(bench_factory,
                                                                     server: Wakaama) -> None:
    """A cancel (empty Package URI) while a PULL is in flight (State 1; the HTTP server sent
    its headers and holds the body): State 0 Result 0 at once, the download stopped (not left
    to the read timeout), the cancel journalled as an intent and finished, nothing sent to the
    device; a later Update is 4.05."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    fs = FileStore(release=asyncio.Event())  # set at the end only: the body never comes
    app = web.Application()
    fs.routes(app)
    async with serve(app) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        url = base + fs.add("app-2.0.0.bin", bench.images["2.0.0"].read_bytes())
        async with daemon(lwm2m_cfg(bench, sim, server, download_read_timeout_s=120)) as gw:
            c = await server.registered("udp-1")
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/1", url)).code == "2.04"
            await server.notified(c, STATE, 1, 10, m)
            await asyncio.wait_for(fs.started.wait(), 30)  # the GET is in flight
            t0 = time.monotonic()
            assert (await server.write(c, "/5/0/1", '[{"bn":"/5/0/1","vs":""}]')).code == "2.04"
            await server.notified(c, STATE, 0, 10, m)
            await wait_until(lambda: "intent-cancel-done" in cancel_events(gw, "udp-1"), 20,
                             "the cancel's intent finished")
            assert time.monotonic() - t0 < 15  # not the 120 s read timeout
            assert gw.journal.open_intents("udp-1") == []
            assert cancel_events(gw, "udp-1")[0] == "intent-cancel"  # journalled first
            assert gw.source.endpoint("udp-1").rec.canceled is None  # type: ignore[attr-defined]
            assert server.values(c, RESULT)[-1] == 0 and 2 not in server.values(c, STATE)
            assert (await server.exec(c, "/5/0/2")).code == "4.05"
            assert fs.gets("app-2.0.0.bin") == 1
            assert fs.release is not None
            fs.release.set()  # (the HTTP server's shutdown waits for its handler)
        assert dev.counters["upload_bytes_received"] == 0 and dev.counters["resets"] == 0
        assert active(dev) == ("1.0.0", True)


async def test_gateway_sigkill_mid_upload_resumes_and_re_notifies(bench_factory,
                                                                   server: Wakaama) -> None:
    """``smp-gateway run`` (a real process) is SIGKILLed while it uploads the pushed package
    (State 3). Restarted: the endpoint registers again (the server keeps the client), the
    journal resumes the upload from the device's offset - one install, one test boot - and the
    server, observing again, is told State 3 then State 0 / Result 1."""
    bench = bench_factory(udp=1, serial=0, image_size=64 * 1024,
                          device_kw={"link": {"bandwidth_bps": 20_000}})
    img = bench.images["2.0.0"]
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        data = bench.gateway_dict(sim)
        data["source"] = {"kind": "lwm2m", "server": server.url, "bind_host": "127.0.0.1",
                          "lifetime_s": 60, "poll_interval_s": 30, "request_timeout_s": 20}
        cfg_path = bench.root / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        log_path = bench.root / "gateway.log"
        gw = GatewayProcess(cfg_path, log_path)
        await gw.start()
        try:
            c = await server.registered("udp-1", within=60)
            await observe_fw(server, c)
            m = server.mark()
            assert (await server.write(c, "/5/0/0", f"@{img}", 120)).code == "2.04"
            await until_downloaded(server, c, m)
            assert (await server.exec(c, "/5/0/2")).code == "2.04"
            await server.notified(c, STATE, 3, 10, m)
            await dev.wait_for(lambda d: d.counters["upload_bytes_received"] > 8000, 60)
            await gw.kill()
            cut = dev.counters["upload_bytes_received"]
            assert cut < img.stat().st_size and dev.counters["resets"] == 0
            m = server.mark()
            gw = GatewayProcess(cfg_path, log_path)
            await gw.start()
            assert await server.registered("udp-1", within=60, since=m) == c  # the same client
            m = server.mark()
            await server.cmd(f"observe {c} {STATE}")  # (the old observation's end is told
            await server.notified(c, STATE, 3, 10, m)  # first, as an empty NOTIFY)
            await server.observe(c, RESULT)
            await server.notified(c, RESULT, 1, 120, m)
            await server.notified(c, STATE, 0, 10, m)
            assert tlv_int((await server.read(c, STATE)).payload) == 0
        finally:
            await gw.kill()
        assert active(dev) == ("2.0.0", True)
        assert dev.counters["resets"] == 1  # one test boot: no second install
        # resumed from the device's offset, not sent again from 0
        assert dev.counters["upload_bytes_received"] < img.stat().st_size + cut // 2, (
            dev.counters["upload_bytes_received"], cut, log_path.read_text()[-3000:])
        assert [r["outcome"] for r in journal_rows(bench.root / "gateway-state")] == ["updated"]


class _HostileFw(aiocoap.resource.Resource):
    """A coap:// package server that answers Block2 requests as ``mode`` says."""

    def __init__(self, data: bytes, mode: str) -> None:
        super().__init__()
        self.data, self.mode, self.asked = data, mode, []  # type: ignore[var-annotated]

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False  # every block is answered here, as the mode says

    async def render_get(self, req: aiocoap.Message) -> aiocoap.Message:
        b = req.opt.block2
        num, szx = (b.block_number, b.size_exponent) if b else (0, 6)
        self.asked.append(num)
        if self.mode == "small-blocks":  # a smaller block size than asked: allowed (RFC 7959)
            num, szx = (num << (szx + 4)) >> 6, min(szx, 2)  # the block at the asked offset
        if self.mode == "tiny-forever":
            szx = 0
        size = 1 << (szx + 4)
        if self.mode == "same-block":
            num = 0
        chunk = self.data[num * size:(num + 1) * size]
        more = (num + 1) * size < len(self.data) or self.mode in ("endless", "tiny-forever")
        if self.mode in ("endless", "tiny-forever"):
            chunk = b"\xa5" * size
        return aiocoap.Message(payload=chunk, block2=BlockOption.BlockwiseTuple(num, more, szx))


async def test_coap_pull_hostile_servers_are_bounded(tmp_path: Path) -> None:
    """A coap:// Package URI from a server that sends without end (the size cap: Result 2),
    repeats a block (stopped before the repeat is written), drips tiny blocks for ever
    (``coap_pull_timeout_s``), or legitimately answers with smaller blocks than asked (the
    file is exact)."""
    data = bytes(range(256)) * 40  # 10 KiB
    site = aiocoap.resource.Site()
    servers = {m: _HostileFw(data, m) for m in ("endless", "same-block", "tiny-forever")}
    # 32 round trips of 64-byte blocks, well inside coap_pull_timeout_s on a loaded CI machine
    servers["small-blocks"] = _HostileFw(data[:2048], "small-blocks")
    for m, res in servers.items():
        site.add_resource([m], res)
    port = free_udp_port()
    ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port),
                                                      transports=["udp6"])
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an LwM2M server that never
    silent.bind(("127.0.0.1", 0))  # answers (registration is not what this test is about)
    cfg = Lwm2mSourceConfig(server=f"coap://127.0.0.1:{silent.getsockname()[1]}",
                            bind_host="127.0.0.1", request_timeout_s=5, coap_pull_timeout_s=2.0)
    src = Lwm2mSource(cfg, tmp_path, devices=[("dev-1", None)])
    await src.start()
    try:
        async def pull(mode: str, max_size: int | None = None) -> Path:
            offer = Offer("dev-1", "lwm2m", "a", handle={"uri": f"coap://127.0.0.1:{port}/{mode}",
                                                         "gen": 0})
            return await src.fetch(offer, max_size)

        assert (await pull("small-blocks")).read_bytes() == data[:2048]
        t0 = time.monotonic()
        with pytest.raises(FetchError, match="coap_pull_timeout_s") as ei:
            await pull("tiny-forever")
        assert ei.value.result == UpdateResult.CONNECTION_LOST and time.monotonic() - t0 < 5
        with pytest.raises(FetchError) as ei:
            await pull("endless", 32 * 1024)
        assert ei.value.result == UpdateResult.NOT_ENOUGH_FLASH and len(servers["endless"].asked) == 33
        with pytest.raises(FetchError, match="does not continue") as ei:
            await pull("same-block")
        assert servers["same-block"].asked == [0, 1]
        assert not list((tmp_path / "downloads").glob("*.part"))  # nothing half-written left
    finally:
        await src.close()
        await ctx.shutdown()
        silent.close()


async def test_discovered_device_registers_when_found_and_deregisters_when_gone(
        bench_factory, server: Wakaama) -> None:
    """A device found by discovery (a serial port appears) gets its endpoint and registers;
    unplugged (its port gone), the endpoint deregisters; plugged again, it registers again."""
    bench = bench_factory(udp=0, serial=1, image_size=16 * 1024)
    (d,) = bench.sim_cfg.devices
    d.serial.link = bench.root / "sim-links" / "serial-1"  # the simulator's own, not watched
    ports = bench.root / "ports"
    ports.mkdir()
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["serial-1"]
        cfg = parse_config({
            "gateway_id": "t", "state_dir": str(bench.root / "gw-state"),
            "trusted_keys": [str(bench.key)],
            "source": {"kind": "lwm2m", "server": server.url, "bind_host": "127.0.0.1",
                       "lifetime_s": 60, "poll_interval_s": 30, "request_timeout_s": 20},
            "discovery": {"serial": {"paths": [str(ports / "tty*")], "hotplug": "poll",
                                     "poll_s": 0.2}, "interval_s": 1},
            "device_templates": [{"name": "sim", "id": "{node}", "slot_size": 0x40000,
                                  "match": {"transport": "serial", "board": "sim_board"},
                                  "timeouts": {"reset_s": 15, "request_s": 2.0}}],
        }, bench.root / "gateway.yaml")
        async with daemon(cfg) as gw:
            (ports / "ttyACM0").symlink_to(dev.transport.pty_path)
            c = await server.registered("serial-1", within=30)
            m = server.mark()
            (ports / "ttyACM0").unlink()
            await server.wait(lambda e: e.kind == "DEREGISTERED" and e.client == c, 30, m)
            assert gw.source.endpoint("serial-1") is None  # type: ignore[attr-defined]
            m = server.mark()
            (ports / "ttyACM1").symlink_to(dev.transport.pty_path)
            assert await server.registered("serial-1", within=30, since=m) is not None
        assert dev.counters["resets"] == 0 and dev.image_info(1) is None  # only read


async def test_reads_in_every_format_and_odd_writes_refused(tmp_path: Path) -> None:
    """The server's reads in TLV, SenML JSON, SenML CBOR and text as it asks (4.06 for a
    format the client does not speak); writes of the wrong type (a number for the Package URI
    or the Package, an infinite number, an over-long URI, a read-only resource) are refused
    with 4.00/4.05 and change nothing - a wrongly typed value is never read as "empty", which
    would cancel the package waiting in Downloaded."""
    loop = asyncio.get_running_loop()
    transport, srv = await loop.create_datagram_endpoint(_RawServer, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    cfg = Lwm2mSourceConfig(server=f"coap://127.0.0.1:{port}", bind_host="127.0.0.1",
                            lifetime_s=60, request_timeout_s=5)
    ep = Endpoint(cfg, "dev-1", "dev-1", tmp_path, on_change=lambda *_: None)
    await ep.start()
    mids = iter(range(0x100, 0x200))

    async def ask(code: Any, path: str, payload: bytes = b"", **opts: Any) -> aiocoap.Message:
        mid = next(mids)
        srv.send(_msg(aiocoap.CON, code, mid, mid.to_bytes(2, "big"), payload=payload,
                      uri_path=tuple(path.strip("/").split("/")), **opts), addr)
        msg, _ = await srv.expect(lambda m: m.mtype == aiocoap.ACK and m.mid == mid)
        return msg

    try:
        req, addr = await srv.expect(lambda m: m.code == aiocoap.POST and m.opt.uri_path == ("rd",))
        srv.answer(req, addr, aiocoap.CREATED, location_path=("rd", "0"))
        ep.set(state=2, phase="wait", pkg_version="2.0.0", uri="http://h/fw.bin")  # Downloaded
        r = await ask(aiocoap.GET, "/5/0", accept=codec.CT_TLV)
        assert r.opt.content_format == codec.CT_TLV
        got = {i.rid: i.value for i in codec.tlv_decode(r.payload, instance_level=True)}
        assert got[3] == b"\x02" and got[7] == b"2.0.0"
        for ct in (codec.CT_SENML_JSON, codec.CT_SENML_CBOR):
            r = await ask(aiocoap.GET, "/5/0", accept=ct)
            assert r.opt.content_format == ct
            recs = dict(codec.senml_decode(r.payload, cbor=ct == codec.CT_SENML_CBOR))
            assert recs["/5/0/3"] == 2 and recs["/5/0/1"] == "http://h/fw.bin"
        r = await ask(aiocoap.GET, "/5/0/3", accept=codec.CT_TEXT)
        assert (r.code, r.opt.content_format, r.payload) == (aiocoap.CONTENT, codec.CT_TEXT, b"2")
        assert (await ask(aiocoap.GET, "/5/0", accept=50)).code == aiocoap.NOT_ACCEPTABLE
        sj = codec.CT_SENML_JSON
        for path, payload, ct, want in [
            ("/5/0/1", b'[{"bn":"/5/0/","n":"1","v":5}]', sj, aiocoap.BAD_REQUEST),
            ("/5/0/0", b'[{"bn":"/5/0/","n":"0","vb":true}]', sj, aiocoap.BAD_REQUEST),
            ("/5/0/1", b'[{"bn":"/5/0/","n":"1","v":1e400}]', sj, aiocoap.BAD_REQUEST),
            ("/5/0/1", b"coap://h/" + b"x" * 2100, codec.CT_TEXT, aiocoap.BAD_REQUEST),
            ("/5/0/3", b"0", codec.CT_TEXT, aiocoap.METHOD_NOT_ALLOWED),
            ("/5/0", b'[{"bn":"/5/0/","n":"3","v":0}]', sj, aiocoap.METHOD_NOT_ALLOWED),
        ]:
            r = await ask(aiocoap.PUT, path, payload, content_format=ct)
            assert r.code == want, (path, payload[:40], r.code, r.payload)
            assert (ep.rec.state, ep.rec.phase, ep.rec.canceled) == (2, "wait", None)
    finally:
        await ep.close(deregister=False)
        transport.close()


async def test_push_over_the_size_cap_is_refused_mid_transfer(tmp_path: Path,
                                                              server: Wakaama) -> None:
    """A Package pushed by Block1 past ``max_package_bytes``: the block that crosses the cap
    is answered 4.13 (with Size1 = the cap), the partial file is deleted, State 0 / Result 2
    (not enough flash) - and the blocks after the cap are never written."""
    cfg = Lwm2mSourceConfig(server=server.url, bind_host="127.0.0.1", lifetime_s=60,
                            request_timeout_s=20, max_package_bytes=8 * 1024)
    ep = Endpoint(cfg, "dev-1", "dev-1", tmp_path, on_change=lambda *_: None)
    await ep.start()
    try:
        c = await server.registered("dev-1")
        await server.observe(c, RESULT)
        m = server.mark()
        big = tmp_path / "big.bin"
        big.write_bytes(bytes(range(256)) * 128)  # 32 KiB: 32 blocks of 1 KiB
        r = await server.write(c, "/5/0/0", f"@{big}", within=60)
        assert r.code == "4.13", r
        first = next(i for i, e in enumerate(server.events) if e is r)
        blocks = [e for e in server.events[m:first] if e.kind == "RESULT" and e.code == "2.31"]
        assert len(blocks) == 8  # 8 KiB accepted, the 9th block refused
        await server.notified(c, RESULT, 2, 10, m)  # not enough flash
        # Wakaama answers a 4.13 by sending the whole package again in 16-byte blocks (RFC
        # 7959 allows a retry with smaller blocks; this build retries for ever, Size1 or
        # not): every transfer is refused at the same cap, 512 blocks of 16 bytes = 8 KiB
        second = await server.wait(lambda e: e.kind == "RESULT" and e.get("uri") == "/5/0/0"
                                   and e.code == "4.13", 60, first + 1)
        again = server.events[first + 1:next(i for i, e in enumerate(server.events)
                                             if e is second)]
        assert sum(1 for e in again if e.kind == "RESULT" and e.code == "2.31") == 512
        assert not ep.push_file.exists()  # nothing of a refused package is kept
    finally:
        await ep.close()
