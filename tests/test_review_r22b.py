"""Review r22 (second round): attacks on the permanent-image health check (_check_permanent,
plan.py step 1, _set_check_permanent / the all-INSTALLED branch of _run_set)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from modes_support import active, health_hook, publish_entry, run_pass, sign

from gateway.engine import Status
from gateway.sim.config import ExtraImageConfig
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(240)




async def test_overwrite_only_confirm_app_failed_check_turns_updated_on_the_next_pass(
        bench_factory: Any) -> None:
    """overwrite-only + confirm: app + a failing health_check hook. Pass 1: _after_boot ->
    _after_install -> _check_permanent runs the hook (confirm: app is not looked at) -> FAILED
    "no revert possible". Pass 2: same image, same state; plan.py step 1 re-checks only when
    ``self.dev.confirm != "app"`` -> "running 2.0.0, confirmed", UPDATED, hook never run."""
    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only"})
    bench.device_overrides = {"udp-1": {**health_hook(3), "confirm": "app"}}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=0.3)
        out1 = (await run_pass(cfg)).outcomes[dev.id]
        out2 = (await run_pass(cfg)).outcomes.get(dev.id)
        assert active(dev)[:2] == ("2.0.0", True)
    assert out1.status == Status.FAILED and "probe said 3" in out1.detail, out1
    assert out2 is None or out2.status not in (Status.UPDATED, Status.UP_TO_DATE), out2


async def test_serial_recovery_install_with_failing_hook_is_not_updated(
        bench_factory: Any) -> None:
    """single-app through MCUboot serial recovery: the image is written over the only slot,
    permanent, no revert - the same class as overwrite-only. _flash_from_bootloader reports
    UPDATED as soon as the application answers with the hash: no health window, no
    health_check: hook (the failing hook below is never run)."""
    bench = bench_factory(udp=0, serial=1, device_kw={
        "mcuboot_mode": "single-app", "os_reset_boot_mode": True,
        "serial_recovery": {"boot_mode": True, "no_application": True}})
    bench.device_overrides = {"serial-1": health_hook(3)}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        out = (await run_pass(bench.gateway_config(
            sim, recovery={"enabled": True}, mcuboot_mode="single-app",
            health_check_s=0.3))).outcomes[dev.id]
        assert active(dev)[:2] == ("2.0.0", True)
    assert out.status != Status.UPDATED, out


async def _lossy_once_installed(dev: Any, loss: float) -> None:
    """Responses are lost with probability ``loss`` once 2.0.0 runs (the upload is clean)."""
    while True:
        await asyncio.sleep(0.02)
        try:
            if active(dev)[0] == "2.0.0":
                break
        except StopIteration:
            continue
    dev.cfg.link.response_loss = loss


async def test_healthy_permanent_image_on_a_lossy_link_fails_on_every_pass(
        bench_factory: Any) -> None:
    """A healthy overwrite-only image (no hook) on a link that loses 15% of responses.
    _check_permanent reads with retries=0 and fails on the SECOND miss over the whole window
    (``missed`` is never reset by a good read): over a window of N reads that is
    1 - (1-p)^N - N p (1-p)^(N-1). Every later pass re-runs the same window (plan.py step 1
    -> _after_install) with the same odds, so the false failure does not clear. The test-boot
    health window (_read_slots_through_reboot, the session's retries) rides the same link."""
    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only"})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=8.0,
                                   timeouts={"reset_s": 20, "request_s": 0.5})
        task = asyncio.create_task(_lossy_once_installed(dev, 0.15))
        outs = []
        try:
            for _ in range(3):
                outs.append((await run_pass(cfg)).outcomes.get(dev.id))
        finally:
            task.cancel()
        assert active(dev)[:2] == ("2.0.0", True)
        assert not [e for e in dev.events if e.kind == "crash"]  # healthy all along
    # seen: failed, failed ("it stopped answering during its health window (2 reads
    # unanswered ...)"), then updated by luck on the third; with health_check_s: 30 the odds
    # of a pass are below 0.1%
    # fixed: the window tells loss from a device that is gone (4 unanswered reads in a row)
    # or drops out (at least 2 and 40 % of the reads): the first pass is the success, later
    # ones find it current
    assert outs[0] is not None and outs[0].status == Status.UPDATED, outs[0]
    assert all(o is None or o.status in (Status.UPDATED, Status.UP_TO_DATE) for o in outs), \
        [(o.status.value, o.detail[-160:]) for o in outs if o is not None]


async def test_held_control_test_boot_window_rides_the_same_lossy_link(bench_factory: Any) -> None:
    """(control) The same link, loss and window for a swap image the gateway confirms: the
    test-boot health window (read_slots with the session's retries) passes."""
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=8.0,
                                   timeouts={"reset_s": 20, "request_s": 0.5})
        task = asyncio.create_task(_lossy_once_installed(dev, 0.15))
        try:
            out = (await run_pass(cfg)).outcomes.get(dev.id)
        finally:
            task.cancel()
    assert out is not None and out.status == Status.UPDATED, out


async def test_overwrite_only_image_set_confirm_app_failed_check_turns_updated(
        bench_factory: Any) -> None:
    """The image-set form of the confirm: app hole: pass 1 _set_after_boot ->
    _set_check_permanent runs the failing hook (confirm: app not looked at) -> FAILED; pass 2
    finds every member INSTALLED and the all-INSTALLED branch re-checks only when
    ``self.dev.confirm != "app"`` -> UPDATED "runs the image set", hook never run."""
    bench = bench_factory(udp=1, serial=0, device_kw={"buf_size": 2475,
                                                      "mcuboot_mode": "overwrite-only"})
    img1_old = sign(bench, "img1-1.0.0.bin", "1.0.0", size=16 * 1024)
    img1_new = sign(bench, "img1-2.0.0.bin", "2.0.0", size=16 * 1024)
    bench.sim_cfg.devices[0].extra_images = [
        ExtraImageConfig(slot_size=0x40000, initial_image=img1_old, update="swap")]
    bench.device_overrides = {"udp-1": {**health_hook(3), "confirm": "app"}}
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(img1_new), "image": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=0.3)
        out1 = (await run_pass(cfg)).outcomes[dev.id]
        out2 = (await run_pass(cfg)).outcomes.get(dev.id)
        assert active(dev, 0)[:2] == ("2.0.0", True) and active(dev, 1)[:2] == ("2.0.0", True)
    assert out1.status == Status.FAILED and "probe said 3" in out1.detail, out1
    assert out2 is None or out2.status not in (Status.UPDATED, Status.UP_TO_DATE), out2



async def test_failed_permanent_check_never_lets_the_fix_through(bench_factory: Any) -> None:
    """A permanent image whose check fails for good (2.0.0 is broken: its hook fails; nothing
    can revert it) - the only way out is the server's fix, 3.0.0. But the journal's FAILED row
    with tested_hash == the running hash wins over the source on every pass
    (run/device.py _target: ``tested_running``), and plan.py step 1 re-runs _check_permanent
    on it, FAILED again: 3.0.0 is never attempted, pass after pass (then parked, then again)."""
    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only"},
                          versions=("1.0.0", "2.0.0", "3.0.0"))
    bench.device_overrides = {"udp-1": {"health_check": {"command": [
        sys.executable, "-c", "import os, sys; v = os.environ['SMPGW_VERSION']; "
        "print('probe of', v); sys.exit(3 if v == '2.0.0' else 0)"], "timeout_s": 30}}}
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=0.3)
        bench.publish("2.0.0")
        out1 = (await run_pass(cfg)).outcomes[dev.id]
        assert out1.status == Status.FAILED and "probe of 2.0.0" in out1.detail, out1
        bench.publish("3.0.0")  # the fix
        later = [(await run_pass(cfg)).outcomes.get(dev.id) for _ in range(3)]
        now = active(dev)[:2]
    assert now == ("3.0.0", True), (now, [(o.status.value, o.new_version, o.detail[-80:])
                                          for o in later if o is not None])
