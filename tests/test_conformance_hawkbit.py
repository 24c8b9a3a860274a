"""The gateway against the hawkBit DDI conformance server (tests/servers/hawkbit_ddi.py, written
from hawkBit's sources): action types, maintenance windows, cancel in each phase, user
confirmation, failures, server faults, and where the gateway token may go. Every test also
checks that the server refused none of the gateway's bodies (``ddi.rejected``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from servers.hawkbit_ddi import Action, Cdn, HawkbitDDI

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

FAST = {"udp": 1, "serial": 0, "image_size": 16 * 1024}
SLOW_LINK = {"link": {"bandwidth_bps": 30_000}}


def cfg(bench: Any, sim: Simulator, ddi: HawkbitDDI, **src: Any) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = {"kind": "hawkbit", "url": ddi.url, "gateway_token": ddi.gateway_token,
                      "poll_interval_s": 1, "min_poll_interval_s": 0.5, **src}
    return parse_config(data, bench.root / "gateway.yaml")


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


def executions(act: Action) -> list[str]:
    return [f["status"]["execution"] for f in act.feedback]


def one_final(act: Action, finished: str) -> dict[str, Any]:
    finals = act.finals()
    assert len(finals) == 1, executions(act)
    assert finals[0]["status"]["result"]["finished"] == finished, finals[0]
    return finals[0]["status"]


async def once(bench: Any, sim: Simulator, ddi: HawkbitDDI, **src: Any) -> Any:
    gw = Gateway(cfg(bench, sim, ddi, **src))
    try:
        return (await gw.run_once()).outcomes["udp-1"]
    finally:
        gw.close()


@pytest.mark.parametrize("kind", ["forced", "soft", "timeforced-due", "timeforced-later"])
async def test_action_types_install(bench_factory, kind: str) -> None:
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        t = kind.split("-")[0]
        forced_time = None if t != "timeforced" else time.time() + (-5 if "due" in kind else 3600)
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0", action_type=t,
                         forced_time=forced_time)
        out = await once(bench, sim, ddi)
        assert out.status == Status.UPDATED, out
        assert active(dev) == ("2.0.0", True)
        one_final(act, "success")
        assert act.status == "finished" and not act.active
        # DDI `downloaded` is never posted for an install (nothing was staged to wait)
        assert "downloaded" not in executions(act)
        assert ddi.rejected == [] and ddi.unauthorized == 0


async def test_download_only_downloaded_after_device_holds_image(bench_factory) -> None:
    """Finding 2: `downloaded` (which closes a download-only action) only once the device
    holds the verified image - not when the gateway's own download finished."""
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        seen: list[Any] = []

        def on_fb(act: Action, body: dict[str, Any]) -> None:
            if body["status"]["execution"] == "downloaded":
                seen.append(dev.image_info(1))

        ddi.on_feedback = on_fb
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0",
                         action_type="downloadonly")
        out = await once(bench, sim, ddi)
        assert out.status == Status.HELD and "download-only" in out.detail, out
        assert str(dev.image_info(1).version) == "2.0.0" and dev.counters["resets"] == 0
        assert len(seen) == 1 and seen[0] is not None and str(seen[0].version) == "2.0.0"
        assert executions(act)[-1] == "downloaded" and act.status == "downloaded"
        det = act.feedback[-1]["status"]["details"][0]
        assert "read back" in det and not det.endswith(": ")
        assert ddi.rejected == []


async def test_window_unavailable_stages_then_installs_when_it_opens(bench_factory) -> None:
    """Finding 1: staged outside hawkBit's maintenance window, installed once it is open."""
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0",
                         maintenance="unavailable")
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.HELD, out
            assert str(dev.image_info(1).version) == "2.0.0" and dev.counters["resets"] == 0
            assert executions(act)[-1] == "downloaded" and act.active  # not closed by it
            n = len(act.feedback)
            out = (await gw.run_once()).outcomes["udp-1"]  # still closed: nothing new
            assert dev.counters["resets"] == 0 and len(act.feedback) == n, executions(act)
            ddi.open_window(act)
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.UPDATED and out.bytes_uploaded == 0, out
        finally:
            gw.close()
        assert active(dev) == ("2.0.0", True)
        one_final(act, "success")
        assert act.status == "finished" and ddi.rejected == []


async def test_window_closing_mid_update_holds_the_reset(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=96 * 1024, device_kw=SLOW_LINK)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0",
                         maintenance="available")
        uploading = asyncio.Event()
        gw = Gateway(cfg(bench, sim, ddi), on_progress=lambda i, st, off, tot:
                     uploading.set() if st == "upload" and off else None)
        try:
            run = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(uploading.wait(), 30)
            ddi.close_window(act)
            out = (await asyncio.wait_for(run, 60)).outcomes["udp-1"]
            assert out.status == Status.HELD and "maintenance window" in out.detail, out
            assert dev.counters["resets"] == 0 and active(dev) == ("1.0.0", True)
            assert act.active and act.finals() == []
            ddi.open_window(act)
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.UPDATED, out
        finally:
            gw.close()
        assert active(dev) == ("2.0.0", True)
        one_final(act, "success")
        assert ddi.rejected == []


async def test_confirmation_required_waits_for_the_confirmation(bench_factory) -> None:
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0", confirmation=True)
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.UP_TO_DATE and dev.image_info(1) is None, out
            assert act.feedback == [] and act.status == "wait_for_confirmation"
            ddi.confirm(act)
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.UPDATED, out
        finally:
            gw.close()
        one_final(act, "success")
        assert ddi.rejected == []


async def test_crash_rolls_back_and_closes_with_failure(bench_factory) -> None:
    bench = bench_factory(**FAST, device_kw={"crash_on_boot_versions": ["2.0.0"],
                                             "crash_after_s": 0.2})
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        out = await once(bench, sim, ddi)
        assert out.status == Status.ROLLED_BACK, out
        assert active(dev) == ("1.0.0", True)
        st = one_final(act, "failure")
        assert isinstance(st.get("code"), int) and act.status == "error"
        assert ddi.rejected == []


async def test_hash_mismatch_fails_before_the_device(bench_factory) -> None:
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        ddi.corrupt.add(act.modules[0].artifacts[0].filename)
        out = await once(bench, sim, ddi, download_retries=0)
        assert out.status == Status.FAILED and "sha256" in out.detail, out
        assert out.bytes_uploaded == 0 and dev.image_info(1) is None
        one_final(act, "failure")
        assert ddi.rejected == []


async def test_cancel_during_download_is_seen_and_nothing_is_pushed(bench_factory) -> None:
    """Finding 3: a cancel while the artifact downloads stops it; nothing goes to the device,
    no `proceeding` reaches the canceling action, the cancel is confirmed."""
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        ddi.slow_artifacts = 1.5  # ~7 s for the artifact
        ddi.artifact_started = asyncio.Event()
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            run = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(ddi.artifact_started.wait(), 20)
            t0 = time.monotonic()
            ddi.cancel(act)
            out = (await asyncio.wait_for(run, 60)).outcomes["udp-1"]
            took = time.monotonic() - t0
        finally:
            gw.close()
        assert took < 4.0, took  # seen during the download (poll period 1 s), not after it
        assert dev.image_info(1) is None and out.bytes_uploaded == 0, out
        assert "canceled" in out.detail, out
        assert [s for s, _ in act.trail if s == "canceling"] == [], act.trail
        assert act.status == "canceled"
        fb = act.cancel_feedback[-1]["status"]
        assert fb["execution"] == "closed" and fb["result"]["finished"] == "success"
        assert ddi.rejected == []


async def test_cancel_before_and_during_upload(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=96 * 1024, device_kw=SLOW_LINK)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        image = bench.images["2.0.0"].read_bytes()
        first = ddi.deploy("udp-1", image, "2.0.0")
        ddi.cancel(first)  # before the gateway saw it: confirmed, nothing done
        gw = Gateway(cfg(bench, sim, ddi, progress_interval_s=0.5))
        uploading = asyncio.Event()
        gw.on_progress = (lambda i, st, off, tot: uploading.set()  # type: ignore[assignment]
                          if st == "upload" and off > tot // 3 else None)
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            assert first.status == "canceled" and dev.image_info(1) is None, out
            second = ddi.deploy("udp-1", image, "2.0.0")
            run = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(uploading.wait(), 30)
            ddi.cancel(second)
            out = (await asyncio.wait_for(run, 60)).outcomes["udp-1"]
        finally:
            gw.close()
        assert "phase upload" in out.detail, out
        assert active(dev) == ("1.0.0", True) and dev.counters["resets"] == 0
        assert second.status == "canceled"
        det = second.cancel_feedback[-1]["status"]["details"][0]
        assert "not erased" not in det, det
        # upload progress went upstream, bounded (finding 4)
        cnts = [f["status"]["result"]["progress"]["cnt"] for f in second.feedback
                if f["status"]["result"].get("progress")]
        assert len(set(cnts)) >= 3 and len(cnts) <= 25, cnts
        assert ddi.rejected == []


async def test_server_faults_final_report_delivered_exactly_once(bench_factory) -> None:
    bench = bench_factory(**FAST)
    ddi = HawkbitDDI()
    await ddi.start()
    try:
        async with Simulator(bench.sim_cfg) as sim:
            dev = sim.devices["udp-1"]
            act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
            ddi.final_faults = [500, "drop"]
            out = await once(bench, sim, ddi)
            assert out.status == Status.UPDATED and act.finals() == [], executions(act)
            await ddi.stop()  # the server restarts; a restarted gateway retries the report
            out = await once(bench, sim, ddi)
            assert out.status == Status.FAILED
            await ddi.start()
            await once(bench, sim, ddi)  # "drop": applied, but the answer is lost
            assert len(act.finals()) == 1
            await once(bench, sim, ddi)  # sent again: 410 Gone - not a second final
            await once(bench, sim, ddi)
            one_final(act, "success")
            assert active(dev) == ("2.0.0", True)
            # a wrong token: an authentication error naming the config key (finding 4)
            out = await once(bench, sim, ddi, gateway_token="a-rotated-token")
            assert "source.gateway_token" in out.detail and "network" not in out.detail, out
            assert ddi.rejected == []
    finally:
        await ddi.stop()


async def test_gateway_token_stays_on_the_server_origin(bench_factory) -> None:
    """Finding 5: artifacts on another origin (a CDN on another port) only when allowed, and
    never with the token; multi-module downloads use each URL's own origin."""
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Cdn() as cdn, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        image = bench.images["2.0.0"].read_bytes()
        act = ddi.deploy("udp-1", image, "2.0.0")
        act.links_origin = cdn.url
        cdn.files[act.modules[0].artifacts[0].filename] = image
        out = await once(bench, sim, ddi)  # not allowed: the action fails, nothing fetched
        assert out.status == Status.FAILED and "download_hosts" in out.detail, out
        assert cdn.requests == [] and dev.image_info(1) is None
        assert "download_hosts" in one_final(act, "failure")["details"][0]

        act = ddi.deploy("udp-1", image, "2.0.0")
        act.links_origin = cdn.url
        cdn.files[act.modules[0].artifacts[0].filename] = image
        out = await once(bench, sim, ddi, download_hosts=[cdn.url])
        assert out.status == Status.UPDATED, out
        assert cdn.requests and all("Authorization" not in h for _, h in cdn.requests)
        assert all(a == f"GatewayToken {ddi.gateway_token}" for a in ddi.auth_headers_seen())
        assert ddi.rejected == []


async def test_controller_attributes_inventory(bench_factory) -> None:
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        await once(bench, sim, ddi)
        attrs = ddi.attributes["udp-1"]
        assert [s for _, _, s in ddi.config_puts] and all(s == 200 for _, _, s in ddi.config_puts)
        assert attrs["mcuboot_mode"] and attrs["mcumgr.buf_count"] == str(dev.cfg.buf_count)
        assert attrs["mcumgr.buf_size"] and attrs["slot0.version"] == "1.0.0"
        assert attrs["sw_version"] == "1.0.0"
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        await once(bench, sim, ddi)
        await once(bench, sim, ddi)  # hawkBit asks for the attributes after FINISHED
        attrs = ddi.attributes["udp-1"]
        assert act.status == "finished" and attrs["slot0.version"] == "2.0.0"
        assert attrs["last_outcome"] == "updated"
        assert ddi.rejected == []


async def test_controller_attributes_hawkbit_would_refuse_are_cleaned(bench_factory) -> None:
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        await once(bench, sim, ddi, attributes={"site": "Zürich ~ hall 2", "long": "x" * 300})
        assert all(s == 200 for _, _, s in ddi.config_puts), ddi.config_puts
        attrs = ddi.attributes["udp-1"]
        assert attrs["site"] == "Z?rich ? hall 2" and attrs["long"] == "x" * 128


async def test_download_only_interrupted_mid_upload_is_staged_not_installed(bench_factory) -> None:
    """A download-only action whose upload was cut short by a gateway crash is resumed from the
    journal as download-only: staged, `downloaded`, no mark, no reset (the server never asked
    for the install; the journal's offer used to come back as 'forced' and install it)."""
    from safety_support import Request, Tap

    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        tap = Tap(dev).install()
        stalled = asyncio.Event()

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_upload and int(req.body.get("off", 0)) > 0:
                stalled.set()  # the device stops answering after the first chunk
                return False
            return True

        tap.hook = hook
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0",
                         action_type="downloadonly")
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            task = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(stalled.wait(), 30)
            task.cancel()  # the gateway dies mid-upload (the journal keeps the attempt)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert gw.journal.get("udp-1").outcome is None  # an unfinished attempt to resume
        finally:
            gw.close()
        tap.hook = None
        out = await once(bench, sim, ddi)
        assert out.status == Status.HELD and "download-only" in out.detail, out
        assert dev.counters["resets"] == 0
        assert not any(s.pending for s in dev.server.state_images())
        assert str(dev.image_info(1).version) == "2.0.0"
        assert executions(act)[-1] == "downloaded"
        assert ddi.rejected == []
