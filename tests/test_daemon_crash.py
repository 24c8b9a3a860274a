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
    NotifySocket,
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
    bench = bench_factory(udp=N_DEVICES, serial=0, image_size=40 * 1024,
                          versions=("1.0.0", "2.0.0", "3.0.0"))
    # slow, varied links and boot times: devices are spread over all steps at any moment
    for i, d in enumerate(bench.sim_cfg.devices):
        d.link = LinkConfig(latency_s=0.01, bandwidth_bps=(3000, 5000, 8000, 12000)[i % 4])
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
    target = "2.0.0"

    def all_on(rows: list[dict[str, Any]], version: str) -> bool:
        return len(rows) == N_DEVICES and all(
            r["outcome"] == "updated" and r["target_version"] == version for r in rows)

    try:
        while len(kills) < N_KILLS:
            if target == "2.0.0" and all_on(journal_rows(state_dir), target):
                # the fleet got there before enough kills: a second round, 2.0.0 -> 3.0.0
                target = "3.0.0"
                bench.publish(target)
            gw = GatewayProcess(cfg, log)
            await gw.start()
            # a step some device can still reach (seeded choice)
            rows = journal_rows(state_dir)
            open_steps = [STEPS.index(r["step"]) for r in rows
                          if r["outcome"] is None and r["step"] in STEPS]
            lowest = min(open_steps, default=0)
            want = rng.choice(STEPS[lowest:])

            def in_step(rows: list[dict[str, Any]], want: str = want) -> bool:
                return any(r["step"] == want and r["outcome"] is None and
                           (want != "upload" or r["upload_offset"] > 0) for r in rows)

            await watch_journal(state_dir, in_step, within=4.0)
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random instant inside that step
            rows = journal_rows(state_dir)
            await gw.kill()
            at = Counter(r["step"] for r in rows if r["outcome"] is None)
            kills.append((want, at))
            mid_upload |= {r["device_id"] for r in rows
                           if r["step"] == "upload" and r["outcome"] is None
                           and 0 < r["upload_offset"] < r["upload_total"]}
            print(f"kill {len(kills)}: wanted {want}: {dict(at)}", flush=True)
        # the last life: let it finish, then stop it the way systemd does
        notify = NotifySocket(bench.root / "notify.sock")
        gw = GatewayProcess(cfg, log, notify=notify)
        await gw.start()
        await notify.wait_for("READY=1", 30)
        done = await watch_journal(state_dir, lambda rs: all_on(rs, target), within=120.0,
                                   every=0.2)
        t_term = time.monotonic()
        rc = await gw.terminate(within=25)
        assert rc == 0 and time.monotonic() - t_term < 20.0
        assert done is not None, [(r["device_id"], r["step"], r["outcome"], r["last_error"])
                                  for r in journal_rows(state_dir)]

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
        for dev, kind, det in ev:
            if kind == "upload-done" and det.get("skipped"):
                # the device already held the whole image (first chunk's sha matched): a lost last
                # answer made the session ask again; no byte was written - not an upload from 0
                per[dev]["upload-start"] -= 1
                kind = "upload-skipped"
            per[dev][kind] += 1
        resumed_off = [(d, det["off"]) for d, k, det in ev if k == "upload-resume"]
        starts = [(d, det["sha"]) for d, k, det in ev if k == "upload-start"]
        for d, c in per.items():
            uploads = {sha for dd, sha in starts if dd == d}  # one per version it went through
            assert c["upload-start"] == len(uploads), (d, c)
            assert c["upload-done"] == len(uploads), (d, c)
        # (a device caught mid-upload in the journal may have finished before the kill landed)
        assert len({d for d, off in resumed_off if off > 0} & mid_upload) >= 5, resumed_off
        assert not [det for _, k, det in ev if k == "boot" and "revert" in str(det.get("outcome"))]
        for d in bench.sim_cfg.devices:
            ep = sim.endpoints[d.id]
            states = await udp_image_states(ep["host"], ep["port"])
            act = next(s for s in states if s.active)
            assert (act.version, bool(act.confirmed)) == (target, True), (d.id, states)
            assert not any(s.pending for s in states), (d.id, states)
    finally:
        await sim.stop()
