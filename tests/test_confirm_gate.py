"""The last gate before a confirm asks the fleet source (``FleetOps.probe_cancel``, review #20).

A cancel the server makes during the health window reaches no cancel watcher of a slowly
polled source in time (hawkBit ``sleep`` 60 s: its probe runs every 30 s). The engine's
``confirm_gate`` asks the source right before the confirm: a "canceled" is journalled as a
server cancel intent first, the image is never confirmed and is taken back in the same attempt,
then acknowledged. A server that does not answer within ``CONFIRM_PROBE_S`` does not hold the
confirm (the device's own health check passed, (b)). An AWS-jobs source that learns a closed
execution from a rejected status update wakes the device's cancel watcher at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import serve
from fleet_servers.hawkbit import HawkbitServer
from fleet_servers.mosquitto import mosquitto
from servers.aws_jobs import AwsJobs
from test_trust_intents import active, confirms

from gateway import fleetops
from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.sources.base import DeviceView, Report, ReportRefused, UpdateState
from gateway.sources.mqtt_jobs import MqttJobsSource
from gateway.sources.settings import MqttJobsSourceConfig

pytestmark = pytest.mark.timeout(120)

SLOW_POLL = {"poll_interval_s": 60, "min_poll_interval_s": 30}


class HangingHawkbit(HawkbitServer):
    """hawkBit whose controller base never answers once ``hang`` is set (a hostile server)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.hang = False
        self.base_gets = 0
        self.released = asyncio.Event()

    async def base(self, request: web.Request) -> web.Response:
        self.base_gets += 1
        if self.hang:
            await self.released.wait()  # no answer until the test ends (the client gives up)
        return await super().base(request)


def _cfg(bench: Any, sim: Simulator, base: str, hb: HawkbitServer) -> Any:
    data = bench.gateway_dict(sim, timeouts={"reset_s": 30, "request_s": 2.0},
                              health_check_s=0.3)
    data["source"] = {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                      **SLOW_POLL}
    return parse_config(data, bench.root / "gateway.yaml")


async def test_hawkbit_cancel_in_the_health_window_is_not_confirmed(bench_factory: Any) -> None:
    """hawkBit cancels the action as the health window starts; its next poll is 30 s away:
    the confirm gate asks, journals the cancel, and the attempt takes the update back."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    hb = HangingHawkbit(sleep="00:01:00")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = hb.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")

        def progress(_d: str, step: str, _o: int, _t: int) -> None:
            if step == "confirm" and act.status == "running":
                hb.cancel(act)  # canceled on the server right before the confirm

        gw = Gateway(_cfg(bench, sim, base, hb), on_progress=progress)
        try:
            out = (await asyncio.wait_for(gw.run_once(), 90)).outcomes["udp-1"]
            intents = [e for e in gw.journal.events("udp-1") if e[2].startswith("intent-cancel")]
            left = gw.journal.open_intents("udp-1")
        finally:
            gw.close()
        assert confirms(dev) == [], confirms(dev)  # 2.0.0 was never confirmed
        assert out.status == Status.HELD and "canceled" in out.detail, out
        assert active(dev) == ("1.0.0", True)  # taken back in the same attempt
        assert left == [] and intents and intents[0][2] == "intent-cancel", intents
        assert act.status == "canceled"
        fb = act.cancel_feedback[-1]["status"]  # acknowledged once taken back
        assert fb["execution"] == "closed" and fb["result"]["finished"] == "success"


async def test_hawkbit_silent_before_the_confirm_does_not_block_it(bench_factory: Any,
                                                                   monkeypatch: Any) -> None:
    """hawkBit stops answering as the health window starts: the gate waits CONFIRM_PROBE_S at
    most, then confirms on the device's own health check (no cancel was said)."""
    monkeypatch.setattr(fleetops, "CONFIRM_PROBE_S", 1.0)
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    hb = HangingHawkbit(sleep="00:01:00")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        hb.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        seen = 0

        def progress(_d: str, step: str, _o: int, _t: int) -> None:
            nonlocal seen
            if step == "confirm" and not hb.hang:
                hb.hang, seen = True, hb.base_gets
            elif step == "done":  # answers again for the final report
                hb.hang = False
                hb.released.set()

        gw = Gateway(_cfg(bench, sim, base, hb), on_progress=progress)
        try:
            out = (await asyncio.wait_for(gw.run_once(), 90)).outcomes["udp-1"]
            left = gw.journal.open_intents("udp-1")
        finally:
            gw.close()
        assert hb.base_gets > seen  # the gate did ask (and got no answer)
        assert out.status == Status.UPDATED, out
        assert active(dev) == ("2.0.0", True) and left == []


async def test_rejected_update_of_a_closed_execution_wakes_the_watcher(tmp_path: Any) -> None:
    """A status update rejected because the execution was canceled closes the job and wakes
    every device it covers (their cancel probe runs now, not a poll period later)."""
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws:
        await aws.create_job("j1", {"files": [{"url": "http://127.0.0.1:1/x.bin",
                                              "sha256": "00" * 32, "size": 10}]}, ["dev-1"])
        cfg = MqttJobsSourceConfig.model_validate({"host": "127.0.0.1", "port": port,
                                                   "tls": False, "request_timeout_s": 3})
        src = MqttJobsSource(cfg, tmp_path / "state", devices=[("dev-1", None)])
        woken: list[str] = []
        src.set_waker(woken.append)
        try:
            offer = await src.check(DeviceView("dev-1", "nrf"))
            assert offer is not None and woken == []
            await aws.cancel_execution("j1", "dev-1", force=True)
            with pytest.raises(ReportRefused):
                await src.report(offer, Report(UpdateState.UPDATING, progress=0.5))
            assert woken == ["dev-1"]
            assert "canceled" in (await src.canceled(offer) or "")
        finally:
            await src.close()


async def test_hawkbit_cancel_of_a_group_member_before_the_group_confirm(
        bench_factory: Any) -> None:
    """A group member's action is canceled while both members test-run the new image (the
    group's watcher polls every 30 s): the group's confirm gate asks for every member before
    the decision; the cancel is journalled and the WHOLE group goes back, nothing confirmed."""
    from test_groups_cancel import assert_all_back, runs_new_unconfirmed

    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    hb = HangingHawkbit(sleep="00:01:00")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        acts = {d: hb.deploy(d, bench.images["2.0.0"].read_bytes(), "2.0.0")
                for d in sim.devices}
        data = bench.gateway_dict(sim, group="pair", health_check_s=1.0,
                                  timeouts={"reset_s": 30, "request_s": 2.0})
        data["source"] = {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                          **SLOW_POLL}
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            run = asyncio.create_task(gw.run_once())
            await first.wait_for(runs_new_unconfirmed, timeout_s=60)
            await second.wait_for(runs_new_unconfirmed, timeout_s=60)
            hb.cancel(acts[second.id])
            res = await asyncio.wait_for(run, 90)
            events = [e[2] for e in gw.journal.events(second.id)]
            left = gw.journal.open_intents()
        finally:
            gw.close()
        assert_all_back(sim)  # nothing confirmed anywhere, every member on 1.0.0
        assert "intent-cancel" in events and left == [], (events, left)
        assert all("canceled" in o.detail for o in res.outcomes.values()), res.outcomes
        assert acts[second.id].status == "canceled" and acts[second.id].cancel_feedback
