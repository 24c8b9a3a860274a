"""Overwrite-only devices (MCUboot CONFIG_BOOT_UPGRADE_ONLY) on the simulator: the update is
installed for good at the reset; the gateway says so, never promises a rollback, and refuses
what it could not fully verify."""

from __future__ import annotations

import pytest
from modes_support import active, entry, reports, resets, run_pass, sign, upload_requests

from gateway import devkit
from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.timeout(120)

OVERWRITE = {"mcuboot_mode": "overwrite-only"}


async def test_overwrite_only_installs_permanently_and_says_so(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=OVERWRITE)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert out.result == UpdateResult.SUCCESS
        assert "installed permanently, no revert possible" in out.detail
        # the device: 2.0.0 active and confirmed right after the reset, slot 1 erased
        assert active(dev) == ("2.0.0", True, 0)
        assert entry(dev, 0, 1) is None
        assert dev.boot_outcomes[-1] == "overwrite"
        # the gateway sent no confirm (the image is confirmed by construction)
        assert all(not w["confirm"] for w in [dict(e.detail) for e in dev.events
                                              if e.kind == "state-write"])
        rep = reports(bench)[-1]
        assert rep["result"] == 1 and "no revert possible" in rep["detail"]
        # nothing is promised about a revert: the report never mentions one
        assert "rollback" not in rep["detail"] and "revert to" not in rep["detail"]


async def test_overwrite_only_power_cut_mid_copy_finishes_the_copy(bench_factory) -> None:
    """Worst moment for overwrite-only: the power goes while MCUboot copies the new image over
    the old one (neither is whole). MCUboot copies again from the still-marked secondary at the
    next boot; the gateway, waiting for the board, reports what it runs."""
    bench = bench_factory(udp=1, serial=0, device_kw={**OVERWRITE, "power_cut_during_swap": True})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert any(e.kind == "power-cut" for e in dev.events), [e.kind for e in dev.events]
        assert active(dev) == ("2.0.0", True, 0)
        assert reports(bench)[-1]["result"] == 1


async def test_overwrite_only_refuses_an_unsigned_image_before_a_byte(bench_factory) -> None:
    """allow_unsigned lets a swap device test-boot an unsigned image (MCUboot takes it back if it
    fails); overwrite-only has no way back, so nothing the gateway could not verify is sent."""
    bench = bench_factory(udp=1, serial=0, device_kw={**OVERWRITE, "key": None})
    bench.images["2.0.0"] = devkit.sign_image(bench.root / "images" / "unsigned-2.0.0.bin",
                                              version="2.0.0", key=None)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, allow_unsigned=True))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert "overwrite-only has no revert" in out.detail
        assert out.bytes_uploaded == 0 and upload_requests(dev) == 0
        assert resets(dev) == 0
        assert active(dev) == ("1.0.0", True, 0)


async def test_overwrite_only_image_refused_by_mcuboot_is_reported_honestly(bench_factory,
                                                                            tmp_path) -> None:
    """Signed with a key the gateway trusts but the device's MCUboot does not: MCUboot erases it
    at the reset and nothing is overwritten - reported as such (LwM2M 8)."""
    bench = bench_factory(udp=1, serial=0, device_kw=OVERWRITE)
    other = devkit.make_key(tmp_path / "other.pem")
    bench.images["2.0.0"] = sign(bench, "other-2.0.0.bin", "2.0.0", key=other)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_dict(sim)
        cfg["trusted_keys"].append(str(other))
        from gateway.config import parse_config

        res = await run_pass(parse_config(cfg, bench.root / "gw.yaml"))
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert out.result == UpdateResult.UPDATE_FAILED
        assert "nothing was overwritten" in out.detail
        assert active(dev) == ("1.0.0", True, 0)
