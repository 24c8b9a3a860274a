"""Review round 2 (r5-trust): attacks on the cancel / intent fixes.

Each test states the trust rule it checks; a FAIL here is the finding."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(240)


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


def runs_new_unconfirmed(dev: Any) -> bool:
    return active(dev) == ("2.0.0", False)


async def test_group_cancel_with_a_member_image_gone_is_not_reported_taken_back(
        bench_factory: Any) -> None:
    """Both members test-run 2.0.0 (group phase boot), the gateway stops; before the restart
    one member's stored image is gone (disk cleanup, or unverifiable after a key rotation);
    the operator cancels. The group's take-back must not claim "every member is back" (and
    close the cancel) while that member still test-runs the canceled 2.0.0."""
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
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            assert gw.journal.group("pair").phase == "boot"  # type: ignore[union-attr]
            img = gw.journal.get(first.id).image_path
        finally:
            gw.close()
        assert img is not None
        Path(img).unlink()  # the stored image of member `first` is gone
        gw = Gateway(cfg)
        try:
            assert gw.fleet.request_cancel(second.id, "canceled by the operator (test)")
            await gw.run_once()
            intents = gw.journal.open_intents()
            closed_as_back = not intents and gw.journal.group("pair").phase == "failed"  # type: ignore[union-attr]
            assert not (closed_as_back and runs_new_unconfirmed(first)), (
                f"cancel closed as 'taken back' while {first.id} still test-runs the canceled "
                f"2.0.0 ({second.id}: {active(second)}): "
                f"{[(e[2], e[3]) for e in gw.journal.events(second.id)][-4:]}")
        finally:
            gw.close()


async def test_group_members_download_only_hawkbit_actions_are_not_installed(
        bench_factory: Any) -> None:
    """hawkBit actions with ``update: skip`` (download-only, or staged outside hawkBit's
    maintenance window) for both members of a group. A single device stages them in slot 1
    and never marks/resets (``FleetOps.admit`` + ``install_gate``); a group must not mark,
    reset and confirm them (server metadata may only withhold a reset, never allow one)."""
    from fleet_servers.common import serve
    from test_trust_intents import FAST_RETRY, CountingHawkbit

    from gateway.config import parse_config

    bench = bench_factory(udp=2, serial=0)
    hb = CountingHawkbit(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        for d in ("udp-1", "udp-2"):
            hb.deploy(d, bench.images["2.0.0"].read_bytes(), "2.0.0", update="skip")
        data = bench.gateway_dict(sim, group="pair", health_check_s=0.5,
                                  timeouts={"reset_s": 30, "request_s": 2.0})
        data["source"] = {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                          "poll_interval_s": 1, "min_poll_interval_s": 0.5}
        data.update(FAST_RETRY)
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        now = {d.id: active(d) for d in sim.devices.values()}
        assert all(v == ("1.0.0", True) for v in now.values()), (
            f"download-only (update=skip) hawkBit actions installed by the group: {now}; "
            f"{ {k: (o.status.value, o.detail[:80]) for k, o in res.outcomes.items()} }")


class _ProbeSource:
    """A source whose ``canceled`` probe answers when the test says so."""

    name = "probe"

    def __init__(self) -> None:
        self.answer: asyncio.Future[str | None] | None = None
        self.asked = asyncio.Event()

    def poll_interval(self) -> float:
        return 0.5

    async def canceled(self, offer: Any) -> str | None:
        self.answer = asyncio.get_running_loop().create_future()
        self.asked.set()
        return await self.answer

    async def report(self, offer: Any, report: Any) -> None:
        return None


@pytest.mark.parametrize("which", ["group", "single"])
async def test_cancel_watcher_ends_when_canceled_as_its_probe_answers(
        bench_factory: Any, which: str) -> None:
    """Round 1 fixed the single-device cancel watcher (``_watch_cancel``: ``_bounded`` and a
    ``stop`` event) against Python 3.11's ``asyncio.wait_for``, which returns the inner
    result and swallows the caller's cancellation when both happen in the same loop turn.
    ``watch_group_cancel`` still probes with ``asyncio.wait_for``; ``GroupRunner.run`` then
    ``await``s the canceled watcher with no bound: a group attempt that ends while a member's
    cancel probe answers (no cancel) hangs until the daemon stops."""
    from gateway.sources.base import Offer

    bench = bench_factory(udp=1, serial=0)
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
    gw = Gateway(cfg)
    src = _ProbeSource()
    gw.source = src  # type: ignore[assignment]
    dev = cfg.devices[0]
    offer = Offer(device_id=dev.id, source="probe", artifact_id="a1")
    try:
        if which == "group":
            watch = asyncio.ensure_future(gw.fleet.watch_group_cancel("g", [(dev, offer, "00" * 32)]))
        else:
            ev, started, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
            watch = asyncio.ensure_future(gw.fleet._watch_cancel(dev, offer, ev, started,
                                                                 "00" * 32, stop))
        await asyncio.wait_for(src.asked.wait(), 5)
        assert src.answer is not None
        src.answer.set_result(None)  # the probe answers "no cancel" ...
        watch.cancel()  # ... in the very turn the run ends and cancels its watcher
        done, _ = await asyncio.wait({watch}, timeout=3.0)
        hung = not done
        if hung:
            watch.cancel()
            await asyncio.wait({watch}, timeout=3.0)
        assert not hung, f"{which} cancel watcher swallowed its cancellation and kept polling"
    finally:
        gw.close()


async def test_group_cancel_with_a_dead_member_link_keeps_the_intent_and_finishes_later(
        bench_factory: Any) -> None:
    """Both members test-run 2.0.0; the gateway stops; one member's link is dead; the operator
    cancels. The take-back cannot finish: the intent must stay open (never closed as taken
    back), and once the link is back the next run finishes it: every member back on 1.0.0."""
    from safety_support import Tap

    bench = bench_factory(udp=2, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        cfg = bench.gateway_config(sim, group="pair", health_check_s=5.0,
                                   timeouts={"reset_s": 5, "request_s": 1.0})
        gw = Gateway(cfg)
        try:
            run = asyncio.create_task(gw.run_once())
            await first.wait_for(runs_new_unconfirmed, timeout_s=120)
            await second.wait_for(runs_new_unconfirmed, timeout_s=120)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        finally:
            gw.close()
        dead = [True]
        tap = Tap(first)
        tap.hook = lambda req, frame, reply: not dead[0]
        tap.install()
        gw = Gateway(cfg)
        try:
            assert gw.fleet.request_cancel(second.id, "canceled by the operator (test)")
            res1 = await gw.run_once()
            open1 = gw.journal.open_intents()
            phase1 = gw.journal.group("pair").phase  # type: ignore[union-attr]
            dead[0] = False
            res2 = await gw.run_once()
            open2 = gw.journal.open_intents()
        finally:
            gw.close()
        assert open1, f"intent closed while {first.id} was unreachable: {res1.outcomes}"
        assert phase1 == "revert", phase1
        assert active(second) == ("1.0.0", True)
        assert open2 == [], (open2, res2.outcomes)
        for d in (first, second):
            assert active(d) == ("1.0.0", True), (d.id, d.image_states())


async def test_cancel_of_a_test_booted_set_whose_stored_zip_is_gone(bench_factory) -> None:
    """A two-image set test-boots (health check); the gateway stops; the set's stored zip is
    gone; the operator cancels. The take-back cannot recognise the set's members: it must
    never claim 'taken back' (nor confirm) while image 0 test-runs the set's 2.0.0, and the
    open cancel must stay visible (ctl list: intents)."""
    from modes_support import active as mactive
    from modes_support import publish_entry
    from test_trust_sets_xip import two_images

    bench, imgs = two_images(bench_factory)
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(imgs["img1-2.0.0"]), "image": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=30.0)
        gw = Gateway(cfg)
        try:
            run = asyncio.create_task(gw.run_once())
            await dev.wait_for(lambda d: mactive(d, 0)[:2] == ("2.0.0", False), 120)
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            path = gw.journal.get(dev.id).image_path
        finally:
            gw.close()
        assert path and path.endswith(".zip")
        Path(path).unlink()
        gw = Gateway(cfg)
        try:
            assert gw.fleet.request_cancel(dev.id, "canceled by the operator (test)")
            out = (await gw.run_once()).outcomes[dev.id]
            listed = next(d for d in gw.fleet.list_devices() if d["device"] == dev.id)
            intents = gw.journal.open_intents(dev.id)
        finally:
            gw.close()
        print("OUT", out.status, out.detail)
        if mactive(dev, 0)[:2] == ("2.0.0", False):
            assert intents and listed["intents"], (
                f"cancel closed while image 0 test-runs the canceled set: {out.detail}")
        # image 1 is installed permanently by design (no ``mark: test`` rule): only image 0's
        # slots (0, 1) must never be confirmed
        assert not any(w.detail.get("confirm") and w.detail.get("slot") in (0, 1)
                       for w in dev.events if w.kind == "state-write")


async def test_open_set_revert_is_finished_for_a_paused_device(bench_factory, tmp_path) -> None:
    """A failed set's revert reset is journalled (an intent: ``set_revert_open``) and waits for
    the window; meanwhile the operator pauses the device. A pause stops new work, never the
    taking back of an update (docs/operations.md: 'a pause never holds back the take-back of
    a cancel'); once the window opens the revert must be done, paused or not - else image 0
    test-runs the failed set, unconfirmed, for as long as the pause lasts."""
    from modes_support import active as mactive
    from modes_support import publish_entry, sign
    from test_trust_sets_xip import NEXT_OPEN, OPEN, WINDOW, Clock, two_images, window_gateway

    from gateway import devkit
    from gateway.config import parse_config

    bench, _imgs = two_images(bench_factory)
    other = devkit.make_key(tmp_path / "other.pem")
    bad1 = sign(bench, "img1-2.0.0-other.bin", "2.0.0", key=other, size=16 * 1024)
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(bad1), "image": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim)
        data["trusted_keys"].append(str(other))
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = window_gateway(cfg, clock, close_at_step="verify")
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert "waits for a maintenance window" in out.detail, out
            await gw.fleet.handle({"cmd": "pause", "device": dev.id, "reason": "x"}, "tester")
            clock.now = NEXT_OPEN
            out = (await gw.run_once()).outcomes[dev.id]
        finally:
            gw.close()
        assert mactive(dev, 0)[:2] == ("1.0.0", True), (
            f"paused device still test-runs the failed set's image 0: {out.status} {out.detail}")


async def test_group_resumed_with_a_member_image_gone_goes_back_whole(bench_factory: Any) -> None:
    """Both members test-run 2.0.0 (group phase boot), the gateway stops, one member's stored
    image is gone before the restart; no cancel. The resumed group must never confirm the
    other member alone (the one without its image would revert at its next reset: a mixed
    group): it cannot be finished, so every member goes back, the image-less one from the
    hash the group journalled (c), driven by what the device reports (b)."""
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
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            img = gw.journal.get(first.id).image_path
        finally:
            gw.close()
        assert img is not None
        Path(img).unlink()
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            phase = gw.journal.group("pair").phase  # type: ignore[union-attr]
        finally:
            gw.close()
        now = {d.id: active(d) for d in (first, second)}
        assert all(v == ("1.0.0", True) for v in now.values()), (
            now, phase, {k: (o.status.value, o.detail[:100]) for k, o in res.outcomes.items()})
        assert phase == "failed", phase
