"""A device slow to act on its reset (CI run at ca04a27: real MCUboot in Renode, two suites on
two cores - the gateway read the old boot's state after a reset and called it a bootloader that
did not take the image, or read into the middle of the swap).

Zephyr answers ``os reset`` and reboots CONFIG_MCUMGR_GRP_OS_RESET_MS later; an emulator under
load (or a long delay in the firmware's config) stretches that past the gateway's look for the
link's gap. The device then still answers from its old boot: the gateway must wait for its state
(b) to show the reboot, not report what it read before the reboot. Here the simulated device
reboots ``GONE_PROBE_S + 2`` seconds after its answer, so the link shows no gap in time.

The other side of the bound - a device whose state never changes after an acknowledged reset is
still reported within ``timeouts.reset_s`` as a bootloader that did not take the image - runs
on real Zephyr without MCUboot: tests/test_zephyr_native_flow.py (``check_verdict``)."""

from __future__ import annotations

from typing import Any

import pytest
from modes_support import active, publish_entry, reports, resets, run_pass
from test_multi_image import set_entry, two_images

from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.smp.reboot import GONE_PROBE_S
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.timeout(120)

SLOW = {"reset_delay_s": GONE_PROBE_S + 2.0}


async def test_single_image_updated_on_a_device_slow_to_reset(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=SLOW)
    publish_entry(bench, {"file": str(bench.images["2.0.0"])})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.5))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert active(dev) == ("2.0.0", True, 0)
        assert resets(dev) == 1  # one reset: waited for, not sent again
        assert reports(bench)[-1]["result"] == UpdateResult.SUCCESS.value


async def test_image_set_updated_on_a_device_slow_to_reset(bench_factory: Any) -> None:
    bench, imgs = two_images(bench_factory, **SLOW)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.5))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert active(dev, 0)[:2] == ("2.0.0", True) and active(dev, 1)[:2] == ("2.0.0", True)
        assert resets(dev) == 1

