"""Adversarial review of the LwM2M source (#19): each test reproduces a finding and FAILS on
the code it was written against.

The endpoint is driven message by message from raw UDP sockets (``_RawServer`` of
``test_source_lwm2m``): one plays the LwM2M server the endpoint registered to, another a
different host on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.optiontypes import BlockOption
from test_source_lwm2m import _msg, _RawServer

from gateway.sources.base import Offer, Report, UpdateResult, UpdateState
from gateway.sources.lwm2m import Lwm2mSource
from gateway.sources.lwm2m.endpoint import Endpoint
from gateway.sources.lwm2m.firmware import DOWNLOADED, IDLE, UPDATING
from gateway.sources.settings import Lwm2mSourceConfig

pytestmark = pytest.mark.timeout(120)

_mids = itertools.count(0x1000)


@dataclass
class Peer:
    """A raw CoAP peer (the registered server, or a stranger on the LAN)."""

    proto: _RawServer
    transport: asyncio.DatagramTransport

    async def ask(self, ep_addr: Any, code: Any, path: str, payload: bytes = b"",
                  within: float = 10.0, **opts: Any) -> aiocoap.Message:
        mid = next(_mids) & 0xFFFF
        tok = mid.to_bytes(2, "big")
        self.proto.send(_msg(aiocoap.CON, code, mid, tok, payload=payload,
                             uri_path=tuple(path.strip("/").split("/")), **opts), ep_addr)
        msg, _ = await self.proto.expect(
            lambda m: (m.mtype == aiocoap.ACK and m.mid == mid and m.code != aiocoap.EMPTY)
            or (m.mtype in (aiocoap.CON, aiocoap.NON) and m.token == tok and m.code.is_response()),
            within)
        return msg


async def peer() -> Peer:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_RawServer,
                                                           local_addr=("127.0.0.1", 0))
    return Peer(proto, transport)


@contextlib.asynccontextmanager
async def registered(tmp_path: Path, **cfg_kw: Any) -> AsyncIterator[tuple[Endpoint, Peer, Any]]:
    srv = await peer()
    port = srv.transport.get_extra_info("sockname")[1]
    cfg = Lwm2mSourceConfig(server=f"coap://127.0.0.1:{port}", bind_host="127.0.0.1",
                            lifetime_s=60, request_timeout_s=5, **cfg_kw)
    ep = Endpoint(cfg, "dev-1", "dev-1", tmp_path, on_change=lambda *_: None)
    await ep.start()
    try:
        req, addr = await srv.proto.expect(
            lambda m: m.code == aiocoap.POST and m.opt.uri_path == ("rd",))
        srv.proto.answer(req, addr, aiocoap.CREATED, location_path=("rd", "0"))
        await asyncio.wait_for(ep.registered.wait(), 5)
        yield ep, srv, addr
    finally:
        await ep.close(deregister=False)
        srv.transport.close()


@contextlib.asynccontextmanager
async def silent_source(tmp_path: Path) -> AsyncIterator[Lwm2mSource]:
    """A started Lwm2mSource for ``dev-1`` whose LwM2M server never answers (registration not
    needed)."""
    silent = await peer()
    port = silent.transport.get_extra_info("sockname")[1]
    cfg = Lwm2mSourceConfig(server=f"coap://127.0.0.1:{port}", bind_host="127.0.0.1",
                            request_timeout_s=5)
    src = Lwm2mSource(cfg, tmp_path, devices=[("dev-1", None)])
    await src.start()
    try:
        yield src
    finally:
        await src.close()
        silent.transport.close()


# -- 1. plain CoAP: any host on the network drives /5 -------------------------------------------

async def test_stranger_cannot_execute_update(tmp_path: Path) -> None:
    """The package waits in Downloaded. A host that is NOT the server the endpoint registered
    to (another address:port) executes /5/0/2: the endpoint must not start the install."""
    async with registered(tmp_path) as (ep, srv, addr):
        ep.set(state=DOWNLOADED, phase="wait", pkg_version="2.0.0")
        stranger = await peer()
        try:
            r = await stranger.ask(addr, aiocoap.POST, "/5/0/2")
        finally:
            stranger.transport.close()
        assert (ep.rec.state, ep.rec.phase) == (DOWNLOADED, "wait"), (r.code, ep.rec)
        assert r.code == aiocoap.UNAUTHORIZED
        # the registered server itself is served as before
        assert (await srv.ask(addr, aiocoap.POST, "/5/0/2")).code == aiocoap.CHANGED
        assert (ep.rec.state, ep.rec.phase) == (UPDATING, "install")


async def test_stranger_cannot_cancel_or_replace_the_package(tmp_path: Path) -> None:
    """A host that is not the registered server writes an empty Package URI (cancel) / a new
    Package: the server's Downloaded package must stay, nothing journalled as the server's
    cancel."""
    async with registered(tmp_path) as (ep, _srv, addr):
        ep.set(state=DOWNLOADED, phase="wait", pkg_version="2.0.0", gen=3)
        stranger = await peer()
        try:
            r1 = await stranger.ask(addr, aiocoap.PUT, "/5/0/1", b"", content_format=0)
            r2 = await stranger.ask(addr, aiocoap.PUT, "/5/0/0", b"\x00" * 64,
                                    content_format=42)
        finally:
            stranger.transport.close()
        assert (ep.rec.state, ep.rec.phase, ep.rec.canceled, ep.rec.gen) == (
            DOWNLOADED, "wait", None, 3), (r1.code, r2.code, ep.rec)


# -- 2. Block1 reassembly outside /5/0/0: unbounded, in memory ----------------------------------

@pytest.mark.parametrize("code,path", [(aiocoap.PUT, "/5/0/1"), (aiocoap.PUT, "/5/0"),
                                       (aiocoap.POST, "/5/0/2"), (aiocoap.POST, "/5/0/0")])
async def test_block1_to_other_resources_is_bounded(tmp_path: Path, code: Any, path: str) -> None:
    """Block1 to any resource but PUT /5/0/0 is assembled in memory by aiocoap's Block1Spool
    (``needs_blockwise_assembly`` True), with no cap at all (``bytes +=``: quadratic, too).
    Sent 64 KiB - 8x ``max_package_bytes`` and 32x the 2048-character Package URI limit -
    every block is answered 2.31 Continue: the endpoint keeps buffering. It must refuse
    (4.13) no later than the cap."""
    cap = 8 * 1024
    async with registered(tmp_path, max_package_bytes=cap) as (_ep, srv, addr):
        codes = []
        for num in range(64):
            r = await srv.ask(addr, code, path, b"A" * 1024, content_format=0,
                              block1=BlockOption.BlockwiseTuple(num, True, 6))
            codes.append(r.code)
            if r.code != aiocoap.CONTINUE:
                break
        accepted = sum(1 for c in codes if c == aiocoap.CONTINUE) * 1024
        assert accepted <= cap, f"{path}: {accepted} bytes buffered in memory, all 2.31"
        assert codes[-1] == aiocoap.REQUEST_ENTITY_TOO_LARGE and accepted == 0, codes


async def test_single_block_requests_still_work(tmp_path: Path) -> None:
    """Without the Block1 spool, a request in one block (Block1 0, no more) is served as it
    is: a Package URI written with a Block1 option is taken."""
    async with registered(tmp_path) as (ep, srv, addr):
        uri = b"http://127.0.0.1:9/fw.bin"
        r = await srv.ask(addr, aiocoap.PUT, "/5/0/1", uri, content_format=0,
                          block1=BlockOption.BlockwiseTuple(0, False, 6))
        assert r.code == aiocoap.CHANGED, (r.code, r.payload)
        assert (ep.rec.uri, ep.rec.phase) == (uri.decode(), "fetch")


# -- 3. observations: unbounded -----------------------------------------------------------------

async def test_observations_are_bounded(tmp_path: Path) -> None:
    """Every Observe registration (a 12-byte datagram, any token, from any host) adds an
    observer kept in memory, and every State change then sends a notification to each. 3000
    registrations of /5/0/3 from one peer are all kept; a bound (e.g. one per peer and path,
    or a fixed cap) must hold."""
    async with registered(tmp_path) as (ep, srv, addr):
        n = 3000
        for i in range(n):
            mid = next(_mids) & 0xFFFF
            srv.proto.send(_msg(aiocoap.NON, aiocoap.GET, mid, i.to_bytes(4, "big"),
                                uri_path=("5", "0", "3"), observe=0), addr)
            if i % 200 == 199:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        nodes = ep.tree.nodes[(5, 0, 3)]
        kept = sum(len(getattr(nd, "_observations", ())) for nd in nodes)
        assert kept <= 256, f"{kept} observers of /5/0/3 kept for one peer"


# -- 4. a cancel that came too late: the install's outcome is lost ------------------------------

async def test_cancel_too_late_does_not_lose_the_success(tmp_path: Path) -> None:
    """The engine confirmed the image (State 3, phase install); the server's empty Package URI
    arrives before the engine's success report. The order the daemon then follows: the final
    report (dropped: ``rec.canceled`` is set), the next check raises ServerCanceled, the
    take-back finds the image confirmed ("too late") and acknowledges with done=False. The
    device runs the new image, confirmed - yet the server is left with State 0 / Result 0 and
    an empty PkgVersion, as if the cancel had worked: the outcome is lost."""
    async with silent_source(tmp_path) as src:
        ep = src.endpoint("dev-1")
        assert ep is not None
        ep.set(state=UPDATING, phase="install", gen=5, pkg_version="2.0.0",
               package=str(tmp_path / "p.bin"))
        offer = Offer("dev-1", "lwm2m", "sha256:x", report_to={"endpoint": ep.name, "gen": 5})
        ep.cancel("the server wrote an empty Package URI (cancel)")
        await src.report(offer, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="confirmed"))
        await src.acknowledge_cancel(offer, False, "confirmed: too late to cancel")
        assert (ep.rec.state, ep.rec.result) == (IDLE, int(UpdateResult.SUCCESS)), ep.rec


# -- 5. PULL: every package the server names stays on disk for ever ----------------------------

async def test_pulled_packages_do_not_pile_up_on_disk(tmp_path: Path) -> None:
    """The server writes Package URI after Package URI (distinct coap:// URIs, each refused by
    the pre-flight, say wrong hardware: Result 6). Each download is kept in
    ``<state_dir>/downloads/coap-<sha256(uri)>`` after its outcome was reported - nothing
    deletes it (``report`` removes only the PUSH file) - so disk use grows with every URI the
    server (or, over plain CoAP, any host) names, up to ``max_package_bytes`` each."""
    import aiocoap.resource as resource
    from lwm2m_server import free_udp_port

    data = bytes(range(256)) * 16  # 4 KiB

    class Fw(resource.Resource):
        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(payload=data)

    site = resource.Site()
    for i in range(5):
        site.add_resource([f"fw{i}"], Fw())
    fport = free_udp_port()
    fctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", fport),
                                                       transports=["udp6"])
    try:
        async with silent_source(tmp_path) as src:
            ep = src.endpoint("dev-1")
            assert ep is not None
            for i in range(5):
                await ep._write_uri(f"coap://127.0.0.1:{fport}/fw{i}")
                offer = Offer("dev-1", "lwm2m", f"a{i}", handle={"uri": ep.rec.uri, "gen": ep.rec.gen},
                              report_to={"endpoint": ep.name, "gen": ep.rec.gen})
                path = await src.fetch(offer, None)
                assert path.is_file()
                await src.report(offer, Report(UpdateState.IDLE, UpdateResult.UNSUPPORTED_PACKAGE,
                                               detail="wrong hardware"))
            left = sorted(p.name for p in (tmp_path / "downloads").iterdir())
            assert len(left) <= 1, left
    finally:
        await fctx.shutdown()


# -- (suspicion) a Reboot while a cancel's revert waits: it would test-boot the canceled image ---

async def test_reboot_refused_while_a_cancel_is_open(bench_factory: Any) -> None:
    """A server canceled an update whose image was already marked for test; the revert needs
    a reset, deferred (``cancel-pending``: the journal row closed as canceled, the cancel
    intent open). Inside a maintenance window the server's Reboot (/3/0/4, the daemon's
    ``reboot_device``) must not reset the device: that reset would test-boot the canceled
    image, outside the take-back that is meant to run it (``finish_intents``)."""
    from gateway.cancel import CANCEL_PENDING, CANCELED
    from gateway.config import parse_config
    from gateway.daemon import Gateway
    from gateway.sim.simulator import Simulator

    always = {"cron": "* * * * *", "duration_s": 3600, "timezone": "UTC"}
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        cfg = parse_config({**bench.gateway_dict(sim), "maintenance_windows": {"w": always}},
                           bench.root / "gateway.yaml")
        gw = Gateway(cfg)
        try:
            d = next(x for x in gw.fleet.devices() if x.id == "udp-1")
            data = bench.images["2.0.0"].read_bytes()
            img = gw.store.add_bytes(data, hardware=None)
            async with gw.session(d) as s:
                await s.upload(data)
                await s.image_test(img.info.hash)
            th = img.info.hash.hex()
            gw.journal.put_intent("udp-1", "cancel", th, "server", "canceled by the server")
            e = gw.journal.get("udp-1")
            gw.journal.put(e.with_(step=CANCEL_PENDING, outcome=CANCELED, target_hash=th),
                           "cancel: revert waits for a maintenance window")
            resets = dev.counters["resets"]
            why = await gw.reboot_device("udp-1")
            assert why is not None and "cancel" in why, why
            assert dev.counters["resets"] == resets
            assert dev.image_info(1) is not None  # still pending, for the take-back to revert
        finally:
            gw.close()
