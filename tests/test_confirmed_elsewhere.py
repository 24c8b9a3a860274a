"""An image this gateway test-marked that comes back already confirmed still gets its health
check before a success is reported (#22).

Found by the power-cut campaign on real MCUboot (swap-scratch, cuts 441464 and 441465 in
docs/reliability.md): a cut that tears MCUboot's copy-done or image-ok byte leaves swap type
NONE, the new image never reverts, and img_mgmt reports the running slot confirmed. The
gateway used to report ``updated`` right after the reset - no health window, no
``health_check:`` hook. To the gateway that state is the same as an application that
confirms itself at boot, which is how the simulator makes it here (``app_confirms_after_s:
0``). Now the health window and the hook decide: a failing hook is reported ``failed`` with
"no revert possible" (nothing can take a permanent image back), never ``updated``.
"""

from __future__ import annotations

import sys
from typing import Any

from modes_support import confirm_writes

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult


def _active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active and (s.image or 0) == 0)
    return str(a.version), bool(a.confirmed)



async def _run(bench_factory: Any, exit_code: int) -> tuple[Any, Any, list[str]]:
    bench = bench_factory(udp=1, serial=0)
    bench.sim_cfg.devices[0].app_confirms_after_s = 0.0  # confirmed as soon as it boots
    bench.device_overrides = {"udp-1": {"health_check": {
        "command": [sys.executable, "-c", f"import sys; print('probe said {exit_code}'); "
                    f"sys.exit({exit_code})"], "timeout_s": 30}}}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        gw = Gateway(bench.gateway_config(sim, health_check_s=0.5))
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            steps = [e[2] for e in gw.journal.events("udp-1")]
        finally:
            gw.close()
        assert _active(dev) == ("2.0.0", True)  # permanent either way
        assert not confirm_writes(dev)  # the gateway never sent a confirm
    return out, dev, steps


async def test_confirmed_at_boot_and_unhealthy_is_a_failure_not_a_success(bench_factory: Any) -> None:
    out, _dev, _steps = await _run(bench_factory, 3)
    assert out.status == Status.FAILED, out
    assert out.result == UpdateResult.UPDATE_FAILED
    assert "without this gateway's confirm" in out.detail, out.detail
    assert "no revert possible" in out.detail and "health check failed" in out.detail, out.detail
    assert "probe said 3" in out.detail, out.detail


async def test_confirmed_at_boot_and_healthy_is_a_success_after_the_check(bench_factory: Any) -> None:
    out, _dev, steps = await _run(bench_factory, 0)
    assert out.status == Status.UPDATED, out
    assert "health check passed" in out.detail, out.detail
    assert "confirm" in steps  # the health check was journalled as a step
