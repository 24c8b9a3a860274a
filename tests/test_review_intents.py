"""Adversarial review (r2-intents): intents, operators, identity, scheduling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_trust_identity import twin_sim

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)

_PROBE = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    print("held")
else:
    print("FREE")
"""


def other_process_can_lock(state_dir: Path) -> bool:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(state_dir / "gateway.lock")],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() == "FREE"


async def test_closing_a_second_gateway_in_the_same_process_keeps_the_first_ones_lock(
        bench_factory: Any) -> None:
    """statelock: POSIX lockf locks are per (process, file); closing ANY descriptor of the
    file drops them all. The module allows a second Gateway on the same state_dir in the
    same process ("a simulated restart"); closing it must not leave the first, still running
    Gateway without its lock (another process could then start driving the same devices)."""
    bench = bench_factory(udp=1, serial=0)
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)  # no session is opened
    first = Gateway(cfg)
    try:
        assert not other_process_can_lock(cfg.state_dir)
        second = Gateway(cfg)  # allowed in the same process
        second.close()
        # the first Gateway is still alive and still drives the devices
        assert not other_process_can_lock(cfg.state_dir), (
            "closing the second Gateway released the first Gateway's state_dir lock")
    finally:
        first.close()


async def test_static_device_board_swapped_for_one_without_os_info_is_refused(
        bench_factory: Any) -> None:
    """Identity guard: board-a's identity (node/board) is on record for the static device.
    Another board without os info (the stock smp_svr, or a hostile board that simply answers
    ENOTSUP) now holds the address. It reports nothing, so its fingerprint is '' - and the
    guard returns before comparing with the record: the other board is updated as board-a
    (board-a's image goes to another physical device)."""
    bench = bench_factory(udp=1, serial=0)
    bench.publish("1.0.0")
    async with Simulator(twin_sim(bench, "orig", "127.0.0.1", 0, dev_id="board-a")) as sim:
        port = sim.devices["board-a"].endpoint()["port"]
        cfg = bench.gateway_config(sim)
        gw = Gateway(cfg)
        try:
            first = (await gw.run_once()).outcomes["board-a"]
            assert first.status == Status.UP_TO_DATE, first
            assert gw.fleet.ops.identity("board-a") is not None  # recorded at first use
        finally:
            gw.close()
    bench.publish("2.0.0")
    other_cfg = twin_sim(bench, "other", "127.0.0.1", port, dev_id="board-b")
    other_cfg.devices[0].os_info_supported = False  # says nothing about who it is
    async with Simulator(other_cfg) as sim2:
        other = sim2.devices["board-b"]
        gw = Gateway(cfg)
        try:
            out = (await gw.run_once()).outcomes["board-a"]
        finally:
            gw.close()
        assert other.counters["upload_bytes_received"] == 0, (
            f"another board was updated as board-a: {out.status} {out.detail}")


async def test_server_cancel_while_the_confirm_is_in_flight_reports_no_false_failure(
        bench_factory: Any) -> None:
    """hawkBit cancels the action just as the gateway's confirm reaches the device (its answer
    is still on the way). The device confirmed 2.0.0: the cancel is too late and is rejected -
    fine. But the attempt then ends as FAILED 'canceled: too late' and that is sent to hawkBit
    as the action's final result (closed/failure): the server records an error for a device
    that runs 2.0.0 confirmed."""
    from fleet_servers.common import serve
    from safety_support import Tap
    from test_trust_intents import FAST_RETRY, CountingHawkbit

    from gateway.config import parse_config

    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    hb = CountingHawkbit(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = hb.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        tap = Tap(dev)

        def hook(req: Any, frame: bytes, reply: Any) -> bool:
            if req.is_confirm:
                hb.cancel(act)  # the server cancels now
                tap.deliver(frame, lambda _b: None)  # confirmed; the answer is lost/late
                return False
            return True

        tap.hook = hook
        tap.install()
        data = bench.gateway_dict(sim, timeouts={"reset_s": 30, "request_s": 6.0},
                                  health_check_s=0.2)
        data["source"] = {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                          "poll_interval_s": 1, "min_poll_interval_s": 0.5}
        data.update(FAST_RETRY)
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            outs = []
            for _ in range(4):
                outs.append((await gw.run_once()).outcomes["udp-1"])
                if act.feedback and act.feedback[-1]["status"]["execution"] == "closed":
                    break
        finally:
            gw.close()
        a = next(s for s in dev.server.state_images() if s.active)
        print("OUTS", [(o.status, o.detail) for o in outs])
        print("FB", act.feedback, act.cancel_feedback, act.status)
        assert (str(a.version), bool(a.confirmed)) == ("2.0.0", True)
        finals = [f["status"] for f in act.feedback if f["status"]["execution"] == "closed"]
        assert finals, (act.status, act.feedback, outs)
        assert finals[0]["result"]["finished"] == "success", (
            f"hawkBit told the update failed while the device runs 2.0.0 confirmed: {finals[0]}; "
            f"outcomes {[(o.status, o.detail) for o in outs]}")


async def test_server_cancel_of_a_group_member_is_journalled_and_answered(
        bench_factory: Any) -> None:
    """hawkBit cancels a group member's action while the group uploads. The group runner
    never watches for a cancel (gateway/groups.py has none): the cancel is not journalled as
    an intent, not acted on, never answered; the group goes on and confirms the canceled
    image, and hawkBit's canceling action is closed as a success update."""
    from fleet_servers.common import serve
    from safety_support import Tap
    from test_trust_intents import FAST_RETRY, CountingHawkbit

    from gateway.config import parse_config

    bench = bench_factory(udp=2, serial=0, image_size=64 * 1024)
    hb = CountingHawkbit(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        d1 = sim.devices["udp-1"]
        acts = {d: hb.deploy(d, bench.images["2.0.0"].read_bytes(), "2.0.0")
                for d in ("udp-1", "udp-2")}
        tap = Tap(d1)

        def hook(req: Any, frame: bytes, reply: Any) -> bool:
            if req.is_upload and acts["udp-1"].status == "running":
                hb.cancel(acts["udp-1"])  # the server cancels udp-1's action mid-upload
            return True

        tap.hook = hook
        tap.install()
        data = bench.gateway_dict(sim, group="pair", health_check_s=0.5,
                                  timeouts={"reset_s": 30, "request_s": 2.0})
        data["source"] = {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                          "poll_interval_s": 1, "min_poll_interval_s": 0.5}
        data.update(FAST_RETRY)
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            for _ in range(3):
                res = await gw.run_once()
            intents = gw.journal.open_intents("udp-1")
            events = [e[2] for e in gw.journal.events("udp-1")]
        finally:
            gw.close()
        a1 = next(s for s in d1.server.state_images() if s.active)
        print("OUT", {k: (o.status, o.detail) for k, o in res.outcomes.items()})
        print("ACT", acts["udp-1"].status, acts["udp-1"].cancel_feedback, acts["udp-1"].feedback[-1:])
        assert any(ev.startswith("intent-cancel") for ev in events) or intents, (
            "the server's cancel of a group member was never journalled as an intent")
        assert acts["udp-1"].cancel_feedback, (
            f"hawkBit's cancel was never answered; udp-1 runs {a1.version} "
            f"confirmed={a1.confirmed}; action {acts['udp-1'].status}")


async def test_last_resort_never_reflashes_a_canceled_never_confirmed_image(
        bench_factory: Any) -> None:
    """The operator cancels 2.0.0 during its health check (test-running, unconfirmed): it is
    taken back, the device runs 1.0.0 confirmed. The cancel's journal row keeps the stale
    running_hash of 2.0.0 (undo journals the entry it read before the revert). The device then
    falls into MCUboot serial recovery; ``recovery.last_resort`` re-flashes 'the last image this
    gateway confirmed there' - last_confirmed_path takes running_hash as a candidate whatever
    the outcome, and 1.0.0 (old_hash) is not in the gateway's store - so the canceled,
    never-confirmed 2.0.0 is written permanently through serial recovery."""
    from modes_support import active as active3
    from modes_support import run_pass

    bench = bench_factory(udp=0, serial=1, device_kw={
        "serial_recovery": {"boot_mode": False, "no_application": True}})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=4.0)
        gw: Gateway | None = None

        def on_progress(dev_id: str, step: str, off: int, total: int) -> None:
            if step == "confirm" and gw is not None:  # the health check started
                asyncio.get_running_loop().call_later(
                    0.5, gw.fleet.request_cancel, dev_id, "canceled by the operator (test)")

        import asyncio
        gw = Gateway(cfg, on_progress=on_progress)
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            row = gw.journal.get(dev.id)
        finally:
            gw.close()
        assert "canceled" in out.detail, out
        assert active3(dev) == ("1.0.0", True, 0)  # taken back
        print("ROW", row.outcome, row.running_version, row.old_version, row.tested_hash)
        dev.flash.write(0, 0x400, b"\x00" * 64, sync=True)  # the application's body corrupted
        await dev.power_cycle()
        assert dev.in_recovery
        cfg2 = bench.gateway_config(sim, recovery={"enabled": True, "last_resort": True,
                                                   "entry": "present"})
        res = await run_pass(cfg2)
        print("OUT2", res.outcomes[dev.id])
        assert "2.0.0" not in res.outcomes[dev.id].detail and not (
            dev.in_recovery is False and active3(dev)[0] == "2.0.0"), (
            f"last resort re-flashed the canceled, never confirmed 2.0.0: {res.outcomes[dev.id]}")
