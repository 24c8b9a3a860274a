"""Adversarial review of the core update path (confirm gate, download pruning, real-link
changes, reboot refusal): each test reproduces a finding and FAILS on the code it was written
against."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from aiohttp import web
from fleet_servers.common import serve

from gateway.sources.base import PREFLIGHT_PASSED, Offer, Report, UpdateState
from gateway.sources.lwm2m import Lwm2mSource
from gateway.sources.lwm2m.firmware import DOWNLOADED
from gateway.sources.settings import Lwm2mSourceConfig

pytestmark = pytest.mark.timeout(120)


# -- 1. prune deletes a package an LwM2M update is queued on (Downloaded, waiting for Update) ---

async def test_prune_spares_a_downloaded_package_waiting_for_update(tmp_path: Path) -> None:
    """LwM2M: the server writes a Package URI, the gateway pulls and pre-flights it (State 2
    Downloaded, phase "wait"): the package file in ``<state_dir>/downloads`` is what the update
    installs once the server executes Update - which a server may do days later (a campaign,
    its own window). Another endpoint's download then runs ``Downloader.prune``: the waiting
    package, untouched for more than 7 days and not "in flight", is deleted. The server's
    Update then finds "the package file is gone" (Result 7/CONNECTION_LOST): a queued update
    lost, by a cleanup that was meant to spare files in use."""
    from test_review_lwm2m import peer

    payload = {"/fw1": os.urandom(4096), "/fw2": os.urandom(4096)}

    async def fw(request: web.Request) -> web.Response:
        return web.Response(body=payload[request.path])

    app = web.Application()
    app.router.add_get("/fw1", fw)
    app.router.add_get("/fw2", fw)
    silent = await peer()
    port = silent.transport.get_extra_info("sockname")[1]
    cfg = Lwm2mSourceConfig(server=f"coap://127.0.0.1:{port}", bind_host="127.0.0.1",
                            request_timeout_s=5)
    src = Lwm2mSource(cfg, tmp_path, devices=[("dev-1", None), ("dev-2", None)])
    async with serve(app) as base:
        await src.start()
        try:
            ep1, ep2 = src.endpoint("dev-1"), src.endpoint("dev-2")
            assert ep1 is not None and ep2 is not None
            # dev-1: pulled, pre-flight passed, State 2 - waiting for the server's Update
            await ep1._write_uri(f"{base}/fw1")
            o1 = Offer("dev-1", "lwm2m", "a1", handle={"uri": ep1.rec.uri, "gen": ep1.rec.gen},
                       report_to={"endpoint": ep1.name, "gen": ep1.rec.gen})
            pkg = await src.fetch(o1, None)
            await src.report(o1, Report(UpdateState.DOWNLOADED, detail=PREFLIGHT_PASSED))
            assert (ep1.rec.state, ep1.rec.phase) == (DOWNLOADED, "wait")
            week = time.time() - 8 * 86400  # the server executes Update eight days later
            os.utime(pkg, (week, week))
            # meanwhile (more than a minute after the last prune) dev-2 pulls its package
            src._downloader._pruned_at -= 120.0
            await ep2._write_uri(f"{base}/fw2")
            o2 = Offer("dev-2", "lwm2m", "a2", handle={"uri": ep2.rec.uri, "gen": ep2.rec.gen},
                       report_to={"endpoint": ep2.name, "gen": ep2.rec.gen})
            await src.fetch(o2, None)
            # the server executes Update on dev-1
            await ep1._exec_update(b"")
            from gateway.sources.base import DeviceView
            offer = await src.check(DeviceView("dev-1", "nrf"))
            assert pkg.is_file(), "the queued package was pruned"
            assert offer is not None and offer.handle["path"] == str(pkg), (offer, ep1.rec)
        finally:
            await src.close()
            silent.transport.close()


# -- 2. redaction: a download's error still carries the URL's query (the credential) -----------

@pytest.mark.parametrize("path", ["/loop", "bad"])
async def test_download_errors_never_carry_the_url_query(tmp_path: Path, path: str) -> None:
    """``shown()`` strips a URL's query (a blob SAS token, a presigned URL's signature) from
    the downloader's own words - but the FetchError also quotes aiohttp's exception, whose text
    is the whole URL: a redirect loop (TooManyRedirects: ``url='...?sig=...'``) or a URL aiohttp
    cannot use (InvalidURL: the URL itself). The credential ends in the log, the journal's
    last_error and the report."""
    from gateway.download import Downloader
    from gateway.sources.base import FetchError

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(request.url))  # the same URL again, query included

    app = web.Application()
    app.router.add_get("/loop", loop)
    async with serve(app) as base:
        url = (f"{base}/loop" if path == "/loop" else "http://127.0.0.1:99999/x") + \
            "?sv=2024&sig=SECRET-SAS-TOKEN"
        d = Downloader(tmp_path, retries=0)
        try:
            with pytest.raises(FetchError) as err:
                await d.fetch(url, sha256=None, max_size=1000)
        finally:
            await d.close()
    assert "SECRET-SAS-TOKEN" not in str(err.value), str(err.value)
