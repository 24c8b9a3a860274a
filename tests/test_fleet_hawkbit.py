"""hawkBit server-side control through the loopback DDI server: controller attributes carry
the inventory, a download-only action stages the image and waits for the install, and a
cancelAction during the upload stops it, erases slot 1 and is confirmed to the server."""

from __future__ import annotations

import asyncio
from typing import Any

from fleet_servers.common import serve
from fleet_servers.hawkbit import HawkbitServer

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator


def hb_cfg(bench: Any, sim: Simulator, base: str, hb: HawkbitServer) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                      "poll_interval_s": 1, "min_poll_interval_s": 0.5}
    return parse_config(data, bench.root / "gateway.yaml")


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


async def test_inventory_attributes_and_download_only_then_install(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    hb = HawkbitServer(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        image = bench.images["2.0.0"].read_bytes()
        first = hb.deploy("udp-1", image, "2.0.0", update="skip")
        gw = Gateway(hb_cfg(bench, sim, base, hb))
        try:
            res = await gw.run_once()
            out = res.outcomes["udp-1"]
            assert out.status == Status.HELD and "download-only" in out.detail
            # staged in slot 1, nothing marked, no reset; the action ended at DOWNLOADED
            assert str(dev.image_info(1).version) == "2.0.0" and dev.counters["resets"] == 0
            assert first.status == "downloaded"
            assert first.feedback[-1]["status"]["execution"] == "downloaded"
            attrs = hb.attributes["udp-1"]
            assert attrs["slot0.version"] == "1.0.0" and "confirmed" in attrs["slot0.flags"]
            assert attrs["mcuboot_mode"] == "swap-using-scratch"
            assert attrs["mcumgr.buf_count"] == str(dev.cfg.buf_count)
            # told to install: a forced action for the same artifact; nothing is uploaded again
            second = hb.deploy("udp-1", image, "2.0.0")
            res = await gw.run_once()
            out = res.outcomes["udp-1"]
            assert out.status == Status.UPDATED and out.bytes_uploaded == 0, out
            assert second.status == "finished" and active(dev) == ("2.0.0", True)
            res = await gw.run_once()  # the next check reports the new slots upstream
            assert hb.attributes["udp-1"]["slot0.version"] == "2.0.0"
            assert hb.attributes["udp-1"]["last_outcome"] == "updated"
        finally:
            gw.close()


async def test_cancel_action_during_upload_is_taken_back_and_confirmed(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=96 * 1024,
                          device_kw={"link": {"bandwidth_bps": 30_000}})
    hb = HawkbitServer(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = hb.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        uploading = asyncio.Event()
        gw = Gateway(hb_cfg(bench, sim, base, hb),
                     on_progress=lambda i, st, off, tot: uploading.set() if st == "upload" and off
                     else None)
        try:
            run = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(uploading.wait(), 60)
            hb.cancel(act)  # the operator cancels the action on the server
            res = await asyncio.wait_for(run, 120)
        finally:
            gw.close()
        out = res.outcomes["udp-1"]
        assert "canceled" in out.detail and "phase upload" in out.detail, out
        assert active(dev) == ("1.0.0", True) and dev.image_info(1) is None
        assert dev.counters["resets"] == 0
        assert act.status == "canceled"
        fb = act.cancel_feedback[-1]["status"]
        assert fb["execution"] == "closed" and fb["result"]["finished"] == "success"
