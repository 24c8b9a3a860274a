"""SIGKILL the daemon at random moments in every step; every device must still end confirmed.

The simulator runs in its own process (``python -m gateway.sim``), so killing the gateway
leaves the devices running with whatever they had (upload context in RAM, pending images,
test boots). The gateway (``smp-gateway run``) is a subprocess killed with SIGKILL at moments
chosen from the journal's step column with a seeded RNG, and restarted each time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import pytest
from daemon_support import (
    GatewayProcess,
    SimProcess,
    gateway_yaml,
    journal_rows,
    udp_image_states,
    watch_journal,
)

from gateway.sim.config import LinkConfig

N_DEVICES = 20
N_KILLS = 20
STEPS = ["read-state", "upload", "mark-test", "reset", "wait-boot", "verify", "confirm"]


@pytest.mark.slow
async def test_sigkill_at_random_moments_every_device_ends_confirmed(bench_factory: Any) -> None:
    t_start = time.monotonic()
    bench = bench_factory(udp=N_DEVICES, serial=0, image_size=40 * 1024)
    # slow, varied links and boot times: devices are spread over all steps at any moment
    for i, d in enumerate(bench.sim_cfg.devices):
        d.link = LinkConfig(latency_s=0.01, bandwidth_bps=(5000, 8000, 12000, 20000)[i % 4])
        d.boot_time_s = (0.3, 0.8, 1.5)[i % 3]
    bench.publish("2.0.0")
    sim = SimProcess(bench)
    await sim.start()
    state_dir = bench.root / "gateway-state"
    cfg = gateway_yaml(bench, sim.endpoints, bench.root / "gateway.yaml",
                       retry={"base_s": 0.5, "max_s": 2.0, "max_attempts": 10})
    log = bench.root / "gateway.log"
    rng = random.Random(20240613)
    kills: list[tuple[str, Counter[str]]] = []
    mid_upload: set[str] = set()
    try:
        while len(kills) < N_KILLS:
            gw = GatewayProcess(cfg, log)
            await gw.start()
            want = rng.choice(STEPS)

            def in_step(rows: list[dict[str, Any]], want: str = want) -> bool:
                return any(r["step"] == want and r["outcome"] is None and
                           (want != "upload" or r["upload_offset"] > 0) for r in rows)

            rows = await watch_journal(state_dir, in_step, timeout=6.0)
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random instant inside that step
            rows = journal_rows(state_dir)
            await gw.kill()
            at = Counter(r["step"] for r in rows if r["outcome"] is None)
            kills.append((want, at))
            mid_upload |= {r["device_id"] for r in rows
                           if r["step"] == "upload" and r["outcome"] is None
                           and 0 < r["upload_offset"] < r["upload_total"]}
            if rows and all(r["outcome"] == "updated" for r in rows) and len(rows) == N_DEVICES:
                break
        # the last life: let it finish, then stop it the way systemd does
        gw = GatewayProcess(cfg, log)
        await gw.start()
        done = await watch_journal(
            state_dir, lambda rs: len(rs) == N_DEVICES and all(r["outcome"] == "updated" for r in rs),
            timeout=120.0, every=0.2)
        t_term = time.monotonic()
        rc = await gw.terminate(timeout=25)
        assert rc == 0 and time.monotonic() - t_term < 20.0
        assert done is not None, [(r["device_id"], r["step"], r["outcome"], r["last_error"])
                                  for r in journal_rows(state_dir)]
    finally:
        await sim.stop()

    caught = Counter(s for _, at in kills for s in at.elements())
    print(f"\n{len(kills)} kills; devices caught per step at kill time: {dict(caught)}; "
          f"mid-upload: {len(mid_upload)} devices; {time.monotonic() - t_start:.0f}s")
    assert len(kills) >= N_KILLS
    # kills landed in every phase of the flow
    assert caught["upload"] and (caught["reset"] + caught["wait-boot"]) and (
        caught["verify"] + caught["confirm"]), caught
    assert mid_upload, "no kill interrupted an upload"

    # what the devices say (simulator process log and SMP): every one runs 2.0.0, confirmed,
    # nothing pending; each upload started from offset 0 exactly once (every later attempt
    # resumed from the device's offset) and finished exactly once; nothing was reverted
    ev = sim.events()
    per: dict[str, Counter[str]] = {d.id: Counter() for d in bench.sim_cfg.devices}
    for dev, kind, _ in ev:
        per[dev][kind] += 1
    resumed_off = [(d, det["off"]) for d, k, det in ev if k == "upload-resume"]
    for d, c in per.items():
        assert c["upload-start"] == 1, (d, c)
        assert c["upload-done"] == 1, (d, c)
    assert {d for d, off in resumed_off if off > 0} >= mid_upload
    assert not [det for _, k, det in ev if k == "boot" and "revert" in str(det.get("outcome"))]
    for d in bench.sim_cfg.devices:
        ep = sim.endpoints[d.id]
        states = await udp_image_states(ep["host"], ep["port"])
        act = next(s for s in states if s.active)
        assert (act.version, bool(act.confirmed)) == ("2.0.0", True), (d.id, states)
        assert not any(s.pending for s in states), (d.id, states)
