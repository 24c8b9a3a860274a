"""Issue #22, review round 5 of the image-set "marks cut short" fix: the device loses power between the
set's marks while the gateway keeps running (the power-cut campaign's own setting: only the
board's power is cut)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from modes_support import active, publish_entry, run_pass
from safety_support import Tap
from test_multi_image import set_entry, two_images
from test_review_r22_marks_cut import _journal

from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)


async def test_power_cut_between_marks_with_gateway_alive_is_not_made_permanent_split(
        bench_factory) -> None:
    """Image 0's test mark landed; the board loses power as image 1's permanent mark arrives
    (the frame is lost) and boots: MCUboot test-boots image 0 alone. The gateway is alive: its
    SMP session re-sends image 1's mark (retries=2) to the rebooted board, which takes it. The
    marks loop checks only image 1's slot in the answer, journals "marked", resets: MCUboot
    reverts image 0 (its test boot spent) and installs image 1 for good - the split set the
    mark order exists to prevent, made permanent; the next pass then reports ROLLED_BACK and
    blocks the set. Expected: the rebooted board (image 0 no longer pending) is seen before
    another mark is written, as ``_set_marks_cut`` handles it: reset back, tried again."""
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cut = []

        def hook(req: Any, frame: bytes, reply: Any) -> bool:
            if req.is_confirm and req.body.get("hash") and not cut:
                cut.append(req)
                asyncio.get_running_loop().create_task(dev.power_cycle(wait=False))
                return False  # lost with the power
            return True

        Tap(dev, hook=hook).install()
        cfg = bench.gateway_config(sim)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert cut, "the cut never happened"

        split = active(dev, 1)[0] == "2.0.0" and active(dev, 0)[0] == "1.0.0"
        res = await run_pass(cfg)
        out2 = res.outcomes[dev.id]

        # never a split set made permanent: image 1 new for good beside the old image 0
        assert not split, out
        # nor a cut judged the set's fault: no rollback reported, nothing blocked
        assert out2.status != Status.ROLLED_BACK and _journal(cfg, dev.id).blocked_hash is None
        # the interrupted marks were taken back and tried again: the set is installed whole
        assert out.status == Status.FAILED and "tried again" in out.detail, out
        assert out2.status == Status.UPDATED, out2
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def test_first_mark_landed_then_the_power_went_with_its_answer(bench_factory) -> None:
    """Image 0's test mark lands, its answer is lost with the power, and the board boots image 0
    in test mode before the gateway (still running) hears anything. The mark is not sent
    again blindly (it would hit the running image): the state read after the silence shows
    image 0 already booted, so image 1's mark is never written - the set is reset back and
    tried again, never left split."""
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cut: list[Any] = []
        taps: list[Tap] = []

        def hook(req: Any, frame: bytes, reply: Any) -> bool:
            if req.is_test and not cut:
                cut.append(req)
                taps[0].deliver(frame, lambda *_a, **_k: None)  # it lands; its answer is lost
                asyncio.get_running_loop().create_task(dev.power_cycle(wait=False))
                return False
            return True

        taps.append(Tap(dev, hook=hook).install())
        cfg = bench.gateway_config(sim)
        out = (await run_pass(cfg)).outcomes[dev.id]
        assert cut, "the cut never happened"
        assert out.status == Status.FAILED and "tried again" in out.detail, out
        assert not taps[0].requests(lambda r: r.is_confirm)  # image 1's mark never written
        assert len(taps[0].requests(lambda r: r.is_test)) == 1  # image 0's not sent again
        assert active(dev, 0) == ("1.0.0", True, 0) and active(dev, 1) == ("1.0.0", True, 0)
        out2 = (await run_pass(cfg)).outcomes[dev.id]
        assert out2.status == Status.UPDATED, out2
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)
