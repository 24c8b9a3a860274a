"""A cancel of any group member takes the WHOLE group back (groups are all-or-nothing).

The operator's ``ctl cancel MEMBER`` is journalled as an intent before it is acted on; the
group stops where it is, every member goes back to its previous image (no confirm of the
canceled image anywhere), also when the gateway was stopped mid-group and the cancel is given
before the next start. The moments are chosen from the simulated devices' own state (both
members test-running the new image), never by timing guesses. The server's cancel of a member
is in ``test_review_intents.py`` (hawkBit, acknowledged once the group is back).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


def confirms(dev: Any) -> list[Any]:
    return [e for e in dev.events if e.kind == "state-write" and e.detail.get("confirm")]


def runs_new_unconfirmed(dev: Any) -> bool:
    return active(dev) == ("2.0.0", False)


def assert_all_back(sim: Simulator) -> None:
    for dev in sim.devices.values():
        assert active(dev) == ("1.0.0", True), (dev.id, dev.image_states())
        assert not any(s.pending for s in dev.server.state_images()), dev.image_states()
        assert confirms(dev) == [], f"{dev.id}: the canceled 2.0.0 was confirmed"


async def test_operator_cancel_of_a_member_during_the_health_check_takes_the_group_back(
        bench_factory: Any) -> None:
    bench = bench_factory(udp=2, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        gw = Gateway(bench.gateway_config(sim, group="pair", health_check_s=5.0))
        try:
            run = asyncio.create_task(gw.run_once())
            await first.wait_for(runs_new_unconfirmed, timeout_s=120)
            await second.wait_for(runs_new_unconfirmed, timeout_s=120)
            said = await gw.fleet.handle({"cmd": "cancel", "device": second.id}, "tester")
            assert "group pair" in said, said
            res = await asyncio.wait_for(run, 120)
            assert_all_back(sim)
            outs = res.outcomes
            assert outs[second.id].status == Status.HELD and "canceled" in outs[second.id].detail
            assert outs[first.id].status in (Status.ROLLED_BACK, Status.FAILED), outs
            assert "group pair canceled" in outs[first.id].detail, outs
            assert gw.journal.open_intents() == []
            assert any(e[2] == "intent-cancel" for e in gw.journal.events(second.id))
            assert gw.journal.group("pair").phase == "failed"  # type: ignore[union-attr]
            # a cancel is no verdict on the image: nothing blocked
            assert all(gw.journal.get(i).blocked_hash is None for i in sim.devices)
            assert gw.journal.get(second.id).outcome == "canceled"
        finally:
            gw.close()


async def test_cancel_of_a_member_given_while_the_gateway_was_down_is_finished_first(
        bench_factory: Any) -> None:
    """The gateway stops with both members test-running 2.0.0 (group phase boot); the operator
    cancels a member before the next start. The next run finishes the cancel first: it never
    resumes the group nor confirms 2.0.0 anywhere."""
    bench = bench_factory(udp=2, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        cfg = bench.gateway_config(sim, group="pair", health_check_s=5.0)
        gw = Gateway(cfg)
        try:
            run = asyncio.create_task(gw.run_once())
            await first.wait_for(runs_new_unconfirmed, timeout_s=120)
            await second.wait_for(runs_new_unconfirmed, timeout_s=120)
            run.cancel()  # the gateway dies during the health check
            await asyncio.gather(run, return_exceptions=True)
            assert gw.journal.group("pair").phase == "boot"  # type: ignore[union-attr]
        finally:
            gw.close()
        gw = Gateway(cfg)
        try:
            assert gw.fleet.request_cancel(first.id, "canceled by the operator (test)")
            (intent,) = gw.journal.open_intents(first.id)
            assert intent.target_hash == gw.journal.group("pair").members[first.id]  # type: ignore[union-attr]
            res = await gw.run_once()
            assert_all_back(sim)
            assert all("canceled" in o.detail for o in res.outcomes.values()), res.outcomes
            assert gw.journal.open_intents() == []
            assert gw.journal.group("pair").phase == "failed"  # type: ignore[union-attr]
        finally:
            gw.close()
