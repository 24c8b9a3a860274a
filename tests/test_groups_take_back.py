"""A group's take-back cut short by a link error is resumed, never closed half-way.

Found by the fault schedules (seed 3384, timing-dependent there): a confirmed member is being
taken back (its old image re-installed by a test swap) when its link fails while the old image
test-runs unconfirmed. The group used to be closed ("failed", images blocked) at once; no later
pass finished the take-back, and the member's next reset brought the new image back: the group
ended mixed. Now the group stays in its "revert" phase, and the next attempt confirms the old
image before the group is closed. The link failure is a simulator knob (every request lost),
switched on at the device's own event (the old image's test boot), not by timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.config import LinkConfig
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


def confirms(dev: Any) -> list[Any]:
    return [e for e in dev.events if e.kind == "state-write" and e.detail.get("confirm")]


def old_test_boot(dev: Any) -> bool:
    """The take-back's test swap booted 1.0.0 after 2.0.0 had been confirmed."""
    if not confirms(dev):
        return False
    t = confirms(dev)[0].t
    return any(e.kind == "boot" and e.t > t and e.detail.get("version") == "1.0.0"
               for e in dev.events)


async def test_take_back_cut_by_a_link_error_is_resumed_until_every_member_is_back(
        bench_factory: Any) -> None:
    bench = bench_factory(udp=2, serial=0)
    # the second member answers slowly: the first is confirmed before the second's fault
    bench.sim_cfg.devices[1].link = LinkConfig(request_latency_s=0.3)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        cfg = bench.gateway_config(sim, group="pair", health_check_s=1.0,
                                   timeouts={"reset_s": 3, "request_s": 1.0})

        async def faults() -> None:
            await first.wait_for(lambda d: bool(confirms(d)), timeout_s=120)
            await second.power_cycle(wait=False)  # test-running 2.0.0: MCUboot reverts it
            await first.wait_for(old_test_boot, timeout_s=120)
            first.req_pipe.loss = 1.0  # the link dies while 1.0.0 test-runs unconfirmed

        gw = Gateway(cfg)
        try:
            injector = asyncio.create_task(faults())
            res = await gw.run_once()
            await asyncio.wait_for(injector, 5)
            assert gw.journal.group("pair").phase == "revert"  # type: ignore[union-attr]
            assert all(o.status == Status.FAILED for o in res.outcomes.values()), res.outcomes
            assert res.outcomes[first.id].result == UpdateResult.CONNECTION_LOST
            assert all("resumes at the next attempt" in o.detail for o in res.outcomes.values())
            assert active(first) == ("1.0.0", False)  # the state the old code abandoned
            assert gw.journal.reports() == []  # no decision reported yet
            assert all(gw.journal.get(i).blocked_hash is None for i in sim.devices)

            first.req_pipe.loss = 0.0
            res = await gw.run_once()  # resumes the take-back
            for dev in sim.devices.values():
                assert active(dev) == ("1.0.0", True), (dev.id, dev.image_states())
                assert not any(s.pending for s in dev.server.state_images())
            assert all(o.status == Status.ROLLED_BACK for o in res.outcomes.values()), res.outcomes
            assert all(f"member {second.id}" in o.detail for o in res.outcomes.values())
            assert gw.journal.group("pair").phase == "failed"  # type: ignore[union-attr]
            reps = gw.journal.reports()
            assert sorted(r.device_id for r in reps) == sorted(sim.devices)
            assert all(r.state == "delivered" and r.result == 8 for r in reps), reps
            assert all(gw.journal.get(i).blocked_hash for i in sim.devices)
        finally:
            gw.close()
        # the next reset keeps the old image (it was confirmed, not left test-running)
        await first.power_cycle(wait=True)
        assert active(first) == ("1.0.0", True)


async def test_take_back_is_not_called_done_on_one_stale_state_answer(
        bench_factory: Any) -> None:
    """Found by the fault schedules (seed 281, a device that repeats its previous state answer
    every other read): the second member fails its boot step after its test mark, never
    reset; the take-back's first state read is the device's pre-mark answer (1.0.0 confirmed,
    nothing pending) and the group used to report it rolled back with 2.0.0 still pending -
    the next power cycle test-booted it. A take-back is called done only when a second read
    says the same, so the pending mark is cleared (test boot, MCUboot reverts) first."""
    import cbor2

    bench = bench_factory(udp=2, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        _first, second = sim.devices.values()
        cfg = bench.gateway_config(sim, group="pair", health_check_s=0.3,
                                   timeouts={"reset_s": 3, "request_s": 0.3})
        orig = second.frame_arrived
        st: dict[str, Any] = {"last": None, "marked": False, "drop_info": 0, "stale": 0}

        def arrived(frame: bytes, reply: Any, **kw: Any) -> None:
            op, group, cmd = frame[0] & 7, int.from_bytes(frame[4:6], "big"), frame[7]
            if op == 0 and group == 1 and cmd == 0:
                if st["marked"] and st["stale"] == 0 and st["last"] is not None:
                    st["stale"] += 1  # the pre-mark answer, with this request's sequence
                    last = st["last"]
                    reply(last[:6] + frame[6:7] + last[7:])
                    return

                def keep(b: bytes) -> None:
                    if not st["marked"]:
                        st["last"] = b
                    reply(b)
                orig(frame, keep, **kw)
                return
            if op == 2 and group == 1 and cmd == 0:
                body = cbor2.loads(frame[8:])
                if body.get("confirm") is False:
                    st["marked"] = True
                    st["drop_info"] = 3  # the boot step's read before the reset goes unanswered
            elif op == 0 and group == 0 and cmd == 7 and st["drop_info"] > 0:
                st["drop_info"] -= 1
                return
            orig(frame, reply, **kw)

        second.frame_arrived = arrived  # type: ignore[method-assign]
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            assert st["stale"] == 1 and st["drop_info"] == 0, st  # both faults fired
            assert all(o.status == Status.ROLLED_BACK for o in res.outcomes.values()), res.outcomes
        finally:
            gw.close()
        for dev in sim.devices.values():
            assert not any(s.pending for s in dev.server.state_images()), dev.image_states()
            assert active(dev) == ("1.0.0", True)
        await second.power_cycle(wait=True)  # nothing left to test-boot
        assert active(second) == ("1.0.0", True)
