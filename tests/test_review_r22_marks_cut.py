"""Issue #22, review round 4 of the image-set "marks cut short" fix (power-cut campaign, multi-image
cuts in image 1's trailer): repros of its findings (a torn permanent mark, an application
confirming itself at the revert, a network core) and the probes that held."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from modes_support import active, publish_entry, resets, run_pass, sign
from safety_support import Tap
from test_multi_image import (
    NETCORE1,
    netcore_set,
    set_entry,
    stopped_while_marking,
    two_images,
)

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.journal import Journal
from gateway.sim.config import ExtraImageConfig
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)

WINDOW = {"nightly": {"cron": "0 3 * * *", "duration_s": 3600, "timezone": "UTC"}}
OPEN = dt.datetime(2030, 5, 6, 3, 10, tzinfo=dt.UTC)
CLOSED = dt.datetime(2030, 5, 6, 5, 0, tzinfo=dt.UTC)


def _journal(cfg: Any, dev_id: str) -> Any:

    j = Journal(cfg.state_dir / "journal.sqlite")
    try:
        return j.get(dev_id)
    finally:
        j.close()


# --- finding: a network core set booted whole after a cut (design: reverted, said so) ------
async def test_netcore_set_cut_while_marking_is_reverted_said_and_installed_whole(
        bench_factory) -> None:
    """nRF5340 set (image 1 = network core, permanent, no revert): both marks landed and the
    device lost power before the gateway journalled "marked"; it booted: image 0 test-runs
    2.0.0, the network core took 2.0.0 for good. img_mgmt shows the network core's image in
    its secondary, unmarked - exactly what a mark that never landed shows. Review round 4 found
    the gateway reset image 0 back without a word about the network core. Design: confirming
    image 0 beside a network core that may be old could report a false success, so image 0 is
    reset back; the outcome says the network core may already run the build, and the retry
    installs the whole set (no split left once it finishes)."""
    bench = netcore_set(bench_factory)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        await stopped_while_marking(bench, sim, dev, marks=(0, 1), power_cut=True, images=NETCORE1)
        assert active(dev, 0) == ("2.0.0", False, 0)  # test-runs
        assert str(dev.flash.image_info(2).version) == "2.0.0"  # the network core took 2.0.0
        cfg = bench.gateway_config(sim, images=NETCORE1)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.FAILED and "tried again" in out.detail, out
        assert "network core image(s) [1] may already run" in out.detail, out.detail
        assert _journal(cfg, dev.id).blocked_hash is None
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert active(dev, 0) == ("2.0.0", True, 0)
        assert str(dev.flash.image_info(2).version) == "2.0.0"


# --- finding: the retry revert that cannot revert journals the set as "marked" ---------------
async def test_cut_split_set_whose_app_confirms_itself_at_the_revert_is_not_blocked(
        bench_factory) -> None:
    """Split set after a cut between the marks (image 0 test-runs, image 1 never marked). The
    application confirms itself (its own self-test, ``boot_write_img_confirmed``) just as the
    gateway's revert reset arrives: image 0 stays on 2.0.0. The retry path then journals
    ``tested_hash = <set id>`` ("every mark landed") although image 1 was never marked; the
    next pass judges image 1 "booted and was reverted" and reports ROLLED_BACK - the set is
    blocked and a false rollback reported, the device left split (image 0 2.0.0, image 1
    1.0.0) for good."""
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        await stopped_while_marking(bench, sim, dev, marks=(0,), power_cut=True)
        assert active(dev, 0) == ("2.0.0", False, 0) and active(dev, 1) == ("1.0.0", True, 0)
        armed = [True]

        def app_confirms_at_reset(req: Any, _frame: bytes, _reply: Any) -> bool:
            if req.is_reset and armed[0]:
                armed[0] = False
                dev._app_confirm()  # the application's own confirm, just before the reset
            return True

        tap = Tap(dev, hook=app_confirms_at_reset).install()
        cfg = bench.gateway_config(sim)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert not armed[0] and tap.requests(lambda r: r.is_reset)
        assert out.status == Status.FAILED, out
        e1 = _journal(cfg, dev.id)
        res = await run_pass(cfg)
        out2 = res.outcomes[dev.id]
        e = _journal(cfg, dev.id)
        assert out2.status != Status.ROLLED_BACK and e.blocked_hash is None, (out2.detail, e)
        assert e1.tested_hash != e1.target_hash, ("the journal claims every mark landed", e1)


# --- probes that held ------------------------------------------------------------------------
async def test_split_revert_waits_for_the_window_and_keeps_its_retry_flag(bench_factory) -> None:
    """Outside a maintenance window the split set's revert is journalled, never sent; in the
    next window it is sent, the outcome is FAILED (retry: not blocked), and the next pass
    installs the set."""

    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        await stopped_while_marking(bench, sim, dev, marks=(0,), power_cut=True)
        boots = resets(dev)
        data = bench.gateway_dict(sim)
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")

        class Clock:
            now = CLOSED

            def __call__(self) -> dt.datetime:
                return self.now

        clock = Clock()
        gw = Gateway(cfg)
        gw.fleet.maint.clock = clock
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD, out.detail
            e = gw.journal.get(dev.id)
            assert e.tested_hash is not None and e.tested_hash.endswith("::retry"), e
            assert resets(dev) == boots
            assert active(dev, 0) == ("2.0.0", False, 0)
        finally:
            gw.close()
        clock.now = OPEN
        gw = Gateway(cfg)
        gw.fleet.maint.clock = clock
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            e = gw.journal.get(dev.id)
            assert out.status == Status.FAILED and "tried again" in out.detail, out
            assert e.tested_hash is None and e.blocked_hash is None, e
            assert active(dev, 0) == ("1.0.0", True, 0)
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.UPDATED, out
            assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)
        finally:
            gw.close()


async def test_kill_after_the_revert_reset_before_the_outcome(bench_factory) -> None:
    """The gateway dies right after the revert reset (before its outcome): the next pass finds
    the intent (``:retry``), sees nothing test-running, FAILED + tried again, then installs."""

    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        await stopped_while_marking(bench, sim, dev, marks=(0,), power_cut=True)
        cfg = bench.gateway_config(sim)

        class Killed(BaseException):
            pass

        def progress(_d: str, step: Any, _o: int, _t: int) -> None:
            if str(getattr(step, "value", step)) == "wait-boot":
                raise Killed()

        gw = Gateway(cfg, on_progress=progress)
        try:
            with pytest.raises(Killed):
                await gw.run_once()
            e = gw.journal.get(dev.id)
            assert e.outcome is None and e.tested_hash.endswith(":retry"), e
        finally:
            gw.close()
        await dev.wait_booted(dev.boots, timeout_s=30)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        e = _journal(cfg, dev.id)
        assert out.status == Status.FAILED and "tried again" in out.detail, out
        assert e.tested_hash is None and e.blocked_hash is None, e
        res = await run_pass(cfg)
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def test_three_image_set_cut_after_image1_mark(bench_factory) -> None:
    """3 images (0 test, 1 and 2 permanent): cut after image 1's permanent mark. Image 1 is in
    for good; image 0 is reset back, image 2 never marked; the next pass installs 0 and 2 and
    health-checks (holds)."""
    bench, imgs = two_images(bench_factory)

    i2a = sign(bench, "img2-1.0.0.bin", "1.0.0", size=16 * 1024)
    i2b = sign(bench, "img2-2.0.0.bin", "2.0.0", size=16 * 1024)
    bench.sim_cfg.devices[0].extra_images.append(
        ExtraImageConfig(slot_size=0x40000, initial_image=i2a, update="swap"))
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(imgs["img1-2.0.0"]), "image": 1},
                                     {"file": str(i2b), "image": 2}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        await stopped_while_marking(bench, sim, dev, marks=(0, 1), power_cut=True)
        assert active(dev, 0) == ("2.0.0", False, 0) and active(dev, 1) == ("2.0.0", True, 0)
        assert active(dev, 2) == ("1.0.0", True, 0)
        cfg = bench.gateway_config(sim)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.FAILED and "tried again" in out.detail, out
        first = out.detail
        assert active(dev, 0) == ("1.0.0", True, 0)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert [active(dev, i)[0] for i in range(3)] == ["2.0.0"] * 3
        assert "image 1 installed" in first, first


# --- finding: a torn permanent mark (test swap of image 1) is taken as "installed" -----------
async def test_torn_permanent_mark_of_image1_is_not_reported_updated(bench_factory) -> None:
    """The campaign's cut in image 1's trailer, on the simulator: power lost while img_mgmt
    writes image 1's permanent mark, after the magic and before image_ok (boot_set_next writes
    magic, image_ok, swap_info). MCUboot's table reads magic good + image_ok unset as a TEST
    swap: the device boots image 0 AND image 1 test-running. The new "every member TESTING or
    INSTALLED" path takes the set as this gateway's marks landed, counts image 1 (permanent
    rule, running unconfirmed) as "installed permanently", confirms image 0 only and reports
    UPDATED - and the next reset reverts image 1 (img_mgmt cannot confirm it: rc 32): a split
    set after a reported success."""
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        armed = [True]

        def cut_in_image1_trailer(req: Any, _frame: bytes, _reply: Any) -> bool:
            if armed[0] and req.is_confirm and req.body.get("hash"):
                armed[0] = False
                dev.cfg.power_cut_during_trailer_write = "after-magic"
            return True

        Tap(dev, hook=cut_in_image1_trailer).install()
        cfg = bench.gateway_config(sim)
        res = await run_pass(cfg)
        res.outcomes[dev.id]
        assert not armed[0] and dev.faults.fired.get("power-cut-during-trailer-write"), (
            dev.faults.fired)
        await dev.wait_booted(dev.boots, timeout_s=30)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        if out.status != Status.UPDATED:  # the split set was reset back: the retry installs it
            assert out.status == Status.FAILED and "tried again" in out.detail, out
            res = await run_pass(cfg)
            out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        await dev.power_cycle()  # any later reset: nothing of the set is reverted
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0), (
            "reported UPDATED, the next reset split the set", out.detail)
