"""Final reports are never lost: kept in the journal until the server has them (finding 5).

Each backend runs against its loopback server (real mosquitto for MQTT jobs) and a simulated
device. The server rejects, drops or holds the final report; the gateway is restarted (a new
``Gateway`` on the same state directory: a fresh source with no memory of the offer, only the
journal); the server must then hold exactly one final report, with the right LwM2M result, and
the journal nothing pending.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import FileStore, serve
from fleet_servers.hawkbit import HawkbitServer
from fleet_servers.jobs_service import JobsService
from fleet_servers.latest_release import ReleaseServer
from fleet_servers.mosquitto import mosquitto
from fleet_servers.rdfm import RdfmServer

from gateway import devkit
from gateway.artifacts.mender import build_zephyr_artifact
from gateway.config import parse_config
from gateway.daemon import Gateway, Pass
from gateway.engine import Status
from gateway.journal import Entry
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.slow

CRASH = {"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.2}


def config(bench: Any, sim: Simulator, source: dict[str, Any], **top: Any) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = source
    data.update(top)
    return parse_config(data, bench.root / "gateway.yaml")


async def run(cfg: Any) -> tuple[Pass, list[Any], list[Any]]:
    """One ``--once`` pass of a freshly started gateway: (pass, pending reports, all reports)."""
    gw = Gateway(cfg)
    try:
        res = await gw.run_once()
        return res, gw.journal.unreported(), gw.journal.reports()
    finally:
        gw.close()


def active_version(dev: Any) -> str:
    return str(next(s for s in dev.server.state_images() if s.active).version)


# -- hawkBit ----------------------------------------------------------------------------------
def hawkbit_cfg(bench: Any, sim: Simulator, base: str, hb: HawkbitServer) -> Any:
    return config(bench, sim, {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                               "request_timeout_s": 5})


@pytest.mark.parametrize("fault", [503, "drop"])
async def test_hawkbit_final_feedback_lost_then_sent_once_after_restart(
        bench_factory: Any, fault: int | str) -> None:
    bench = bench_factory(udp=1, serial=0)
    hb = HawkbitServer(final_faults=[fault])
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        act = hb.deploy(dev.id, bench.images["2.0.0"].read_bytes(), "2.0.0")
        cfg = hawkbit_cfg(bench, sim, base, hb)
        res, pending, _ = await run(cfg)
        assert res.outcomes[dev.id].status == Status.UPDATED
        assert active_version(dev) == "2.0.0"
        # not delivered (or delivered without an answer): still pending in the journal
        assert [(p.device_id, p.result) for p in pending] == [(dev.id, int(UpdateResult.SUCCESS))]
        assert pending[0].handle["report_to"]["action_id"] == str(act.id)
        assert len(act.finals()) == (1 if fault == "drop" else 0)

        _, pending, reports = await run(cfg)  # restarted gateway
        assert pending == []
        finals = act.finals()
        assert len(finals) == 1, finals
        assert finals[0]["status"]["result"]["finished"] == "success"
        assert finals[0]["status"]["code"] == int(UpdateResult.SUCCESS)
        assert act.status == "finished"
        # 503: delivered now; drop: the server had it, says so (410), nothing is sent twice
        assert [r.state for r in reports] == (["delivered"] if fault == 503 else ["refused"])

        posts = hb.feedback_posts
        _, pending, _ = await run(cfg)  # and nothing more on the next pass
        assert pending == [] and len(act.finals()) == 1
        assert hb.feedback_posts == posts


async def test_final_report_retried_with_backoff_while_the_server_refuses(
        bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    hb = HawkbitServer(final_faults=[500, 502, 503])
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        act = hb.deploy(dev.id, bench.images["2.0.0"].read_bytes(), "2.0.0")
        cfg = hawkbit_cfg(bench, sim, base, hb)
        await run(cfg)  # try 1: 500
        gw = Gateway(cfg)  # restarted: tries at once
        now = [1000.0]
        gw.clock = lambda: now[0]
        devcfg = cfg.devices[0]
        try:
            await gw.flush_unreported(devcfg)  # try 2: 502
            (rep,) = gw.journal.unreported()
            assert rep.attempts == 2 and "502" in (rep.last_error or "")
            posts = hb.feedback_posts
            await gw.flush_unreported(devcfg)  # not due yet: nothing sent
            assert hb.feedback_posts == posts
            now[0] += cfg.retry.max_s * 1.5 + 1  # past any backoff
            await gw.flush_unreported(devcfg)  # try 3: 503
            assert gw.journal.unreported()[0].attempts == 3
            now[0] += cfg.retry.max_s * 1.5 + 1
            await gw.flush_unreported(devcfg)  # try 4: delivered
            assert gw.journal.unreported() == []
            assert [r.state for r in gw.journal.reports()] == ["delivered"]
            assert len(act.finals()) == 1 and act.finals()[0]["status"]["code"] == 1
        finally:
            await gw.source.close()
            gw.close()


async def test_gateway_killed_while_the_final_feedback_is_in_flight(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=CRASH)
    hold = asyncio.Event()
    hb = HawkbitServer(hold_final=hold)
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        act = hb.deploy(dev.id, bench.images["2.0.0"].read_bytes(), "2.0.0")
        cfg = hawkbit_cfg(bench, sim, base, hb)
        gw = Gateway(cfg)
        try:
            task = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(hb.final_seen.wait(), 120)
            assert [r.attempts for r in gw.journal.unreported()] == [0]  # queued before sending
            task.cancel()  # the gateway dies with the final feedback on the wire
            await asyncio.gather(task, return_exceptions=True)
            assert act.finals() == []
        finally:
            gw.close()
        hb.hold_final = None
        hold.set()  # the held request is lost with the gateway that sent it
        _, pending, _ = await run(cfg)
        assert pending == []
        (final,) = act.finals()
        assert final["status"]["result"]["finished"] == "failure"
        assert final["status"]["code"] == int(UpdateResult.UPDATE_FAILED)
        assert active_version(dev) == "1.0.0"


# -- MQTT jobs ------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["InternalError", "drop"])
async def test_mqtt_final_update_lost_then_sent_once_after_restart(
        bench_factory: Any, tmp_path: Path, fault: str) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=CRASH)
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    img = bench.images["2.0.0"].read_bytes()
    async with (
        mosquitto(tmp_path) as port,
        serve(app) as base,
        JobsService(port, final_faults=[fault]) as svc,
        Simulator(bench.sim_cfg) as sim,
    ):
        (dev,) = sim.devices.values()
        url = base + fs.add("fw.bin", img)
        job = await svc.add_job(dev.id, "j1", {"files": [
            {"url": url, "sha256": hashlib.sha256(img).hexdigest(), "size": len(img),
             "version": "2.0.0"}]})
        job.execution_number = 7
        cfg = config(bench, sim, {"kind": "mqtt_jobs", "host": "127.0.0.1", "port": port,
                                  "tls": False, "request_timeout_s": 2})
        res, pending, _ = await run(cfg)
        assert res.outcomes[dev.id].status == Status.ROLLED_BACK
        assert [(p.device_id, p.result) for p in pending] == [
            (dev.id, int(UpdateResult.UPDATE_FAILED))]
        assert pending[0].handle["report_to"] == {"thing": dev.id, "job_id": "j1",
                                                  "execution_number": 7}
        assert len(job.finals()) == (1 if fault == "drop" else 0)

        _, pending, reports = await run(cfg)  # restarted gateway
        assert pending == []
        (final,) = job.finals()
        assert final["status"] == "FAILED" and job.status == "FAILED"
        assert final["statusDetails"]["lwm2m_result"] == str(int(UpdateResult.UPDATE_FAILED))
        assert final["executionNumber"] == 7
        # the dropped answer: the execution already holds this outcome, so it counts as delivered
        assert [r.state for r in reports] == ["delivered"]
        _, pending, _ = await run(cfg)
        assert pending == [] and len(job.finals()) == 1


# -- RDFM -------------------------------------------------------------------------------------
async def test_rdfm_refusal_in_plan_is_journaled_and_logged_once_after_restart(
        bench_factory: Any) -> None:
    """An artifact the gateway refuses before touching the device (signed by a key it does not
    trust) is a final outcome too: journaled, and logged to RDFM once the server takes it."""
    bench = bench_factory(udp=1, serial=0)
    other_key = devkit.make_key(bench.root / "keys" / "other.pem")
    rogue = devkit.sign_image(bench.root / "images" / "rogue-2.0.0.bin", version="2.0.0",
                              key=other_key, size=64 * 1024, slot_size=0x40000)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = config(bench, sim, {"kind": "rdfm", "url": base, "key_bits": 2048})
        await run(cfg)  # first contact registers the device; an operator accepts it
        srv.accept(dev.id)
        srv.assign(dev.id, build_zephyr_artifact(rogue.read_bytes(), device_types=["sim_board"],
                                                 version="2.0.0"), "2.0.0", "sim_board")
        srv.outcome_faults = [503]
        res, pending, _ = await run(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert dev.counters.get("requests.1.1", 0) == 0  # not one byte sent
        assert [(p.result, p.state) for p in pending] == [
            (int(UpdateResult.INTEGRITY_FAILURE), "pending")]
        assert srv.outcomes(dev.id) == []

        _, pending, reports = await run(cfg)  # restarted gateway
        assert pending == []
        (outcome,) = srv.outcomes(dev.id)
        assert outcome["result"] == int(UpdateResult.INTEGRITY_FAILURE)
        assert outcome["report_id"] == f"{cfg.gateway_id}:{reports[0].id}"
        _, pending, _ = await run(cfg)  # the refused artifact is not reported again
        assert pending == [] and len(srv.outcomes(dev.id)) == 1


# -- latest release and local: no report channel, still journaled and closed properly ---------
async def test_latest_release_outcome_is_journaled_and_closed(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    rs = ReleaseServer()
    async with serve(rs.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        rs.publish("sim_board", "2.0.0", bench.images["2.0.0"].read_bytes())
        cfg = config(bench, sim, {"kind": "latest_release", "url": base,
                                  "project_key": rs.project_key})
        res, pending, reports = await run(cfg)
        assert res.outcomes[dev.id].status == Status.UPDATED
        assert pending == []
        (rep,) = reports
        assert (rep.state, rep.result, rep.handle["report_to"]) == (
            "delivered", int(UpdateResult.SUCCESS), {"version": "2.0.0"})


async def test_outcome_journaled_by_a_killed_gateway_is_queued_and_sent_at_restart(
        bench_factory: Any) -> None:
    """The engine journals an outcome; the gateway dies before queueing its report (between
    two SQLite commits): the next start queues it from the journal, with the journaled handle,
    and sends it once. A group member is left alone while its group's decision is open."""
    bench = bench_factory(udp=2, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        lone, member = sim.devices
        bench.device_overrides[member] = {"group": "g"}
        cfg = bench.gateway_config(sim)
        gw = Gateway(cfg)
        try:
            for dev_id in (lone, member):
                offer_handle = {"device_id": dev_id, "source": "local", "artifact_id": "ab" * 32,
                                "version": "2.0.0", "report_to": {"file": "app-2.0.0.bin"}}
                gw.journal.set_report_handle(dev_id, offer_handle)
                gw.journal.put(Entry(dev_id, step="done", outcome="updated", artifact_id="ab" * 32,
                                     source="local", unreported=json.dumps(
                                         {"result": 1, "detail": "updated: 1.0.0 -> 2.0.0"})))
            from gateway.journal import GroupRecord
            gw.journal.put_group(GroupRecord("g", "confirm", {member: "ab" * 32}))
        finally:
            gw.close()
        gw = Gateway(cfg)
        try:
            for d in cfg.devices:
                await gw.flush_unreported(d)
            reps = gw.journal.reports()
            assert [(r.device_id, r.state, r.result) for r in reps] == [(lone, "delivered", 1)]
            assert gw.journal.get(lone).unreported is None
            assert gw.journal.get(member).unreported is not None  # the group run reports it
            lines = [json.loads(x) for x in (bench.updates_dir / "reports.jsonl").read_text()
                     .splitlines()]
            assert [(x["device"], x["result"], x["file"]) for x in lines] == [
                (lone, 1, "app-2.0.0.bin")]
        finally:
            gw.close()
