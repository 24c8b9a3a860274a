"""The gateway is SIGKILLed once in each engine step, then restarted: the update must finish.

The gateway runs as a real subprocess (``smp-gateway run --once``) against simulated devices in
this process. A small wrapper makes the kill deterministic: right after the journal commits a
row whose step is X (the moment "the journal step column reaches X"), the process sends itself
SIGKILL - no cleanup, no flush, exactly like ``kill -9`` or a power loss of the gateway.
The local source's ``reports.jsonl`` is what the "server" was told.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_faults import Run, target_hash, verdict

from gateway.engine import Outcome, Status
from gateway.sim.simulator import Simulator
from gateway.sources.base import Report, UpdateResult, UpdateState

pytestmark = pytest.mark.timeout(120)

WRAPPER = """
import os, signal, sys
import gateway.journal as j
step, detail = sys.argv[1], sys.argv[2]
orig = j.Journal.put
def put(self, entry, d=""):
    orig(self, entry, d)
    if entry.step == step and (not detail or d == detail):
        os.kill(os.getpid(), signal.SIGKILL)
j.Journal.put = put
from gateway.cli import main
sys.exit(main(sys.argv[3:]))
"""

# (journal step, event detail or "" for any): every step the engine journals before acting
KILL_POINTS = [
    ("read-state", ""),
    ("upload", ""),  # before the first chunk
    ("upload", "upload-progress"),  # mid-upload checkpoint
    ("mark-test", ""),  # journaled, image not yet marked
    ("reset", ""),  # marked, reset not yet sent
    ("wait-boot", ""),  # reset sent
    ("verify", ""),
    ("confirm", ""),  # health check running, not confirmed
    ("done", ""),  # confirmed and journaled, not yet reported
]


async def gateway_proc(cfg: Path, kill: tuple[str, str] | None) -> int:
    args = ["-c", WRAPPER, kill[0] if kill else "", kill[1] if kill else "",
            "run", "--once", "--config", str(cfg)]
    proc = await asyncio.create_subprocess_exec(sys.executable, *args,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 90)
    if kill is None and proc.returncode != 0:
        print(err.decode()[-3000:])
    return int(proc.returncode or 0)


def reports(updates: Path, dev_id: str) -> list[dict[str, Any]]:
    p = updates / "reports.jsonl"
    if not p.exists():
        return []
    return [r for r in map(json.loads, p.read_text().splitlines()) if r["device"] == dev_id]


@pytest.mark.parametrize("kill", KILL_POINTS, ids=[f"{s}{'-' + d if d else ''}" for s, d in KILL_POINTS])
async def test_sigkill_in_each_step(bench_factory: Any, reliability: list[dict[str, Any]],
                                    kill: tuple[str, str]) -> None:
    t0 = time.monotonic()
    knobs: dict[str, Any] = {}
    if kill[1] == "upload-progress":
        knobs = {"link": {"bandwidth_bps": 60_000}}  # the upload lasts > 1 s: one checkpoint
    bench = bench_factory(udp=1, serial=0, device_kw=knobs)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg_path = bench.root / "gateway.yaml"
        bench.gateway_config(sim)  # writes gateway.yaml
        rc1 = await gateway_proc(cfg_path, kill)
        assert rc1 == -signal.SIGKILL, f"the gateway was not killed at {kill} (rc {rc1})"
        after_kill = reports(bench.updates_dir, dev.id)
        rc2 = await gateway_proc(cfg_path, None)
        assert rc2 == 0, "the restarted gateway did not finish the update"
        # what the source was told, pass by pass (the killed pass must not have claimed anything)
        final = reports(bench.updates_dir, dev.id)
        second = final[len(after_kill):]
        assert not after_kill, f"the killed gateway reported {after_kill}"
        reps = [Report(UpdateState(r["state"]), UpdateResult(r["result"]), None, r["detail"])
                for r in second]
        ok = bool(reps) and reps[-1].result == UpdateResult.SUCCESS
        run = Run(outcomes=[Outcome(dev.id, Status.FAILED, UpdateResult.INITIAL, "SIGKILL"),
                            Outcome(dev.id, Status.UPDATED if ok else Status.FAILED,
                                    reps[-1].result if reps else UpdateResult.INITIAL)],
                  reports=[[], reps])
        name = f"sigkill-at-{kill[0]}{'-' + kill[1] if kill[1] else ''}"
        await verdict(reliability, name, "udp (gateway subprocess)", dev, bench.root / "gateway-state",
                      run, target_hash(bench), t0, faults=f"SIGKILL after the journal reached {kill[0]}",
                      expect={Status.UPDATED})
        # confirmed exactly once, by the gateway, and only the tested image
        confirms = [e for e in dev.events if e.kind == "state-write" and e.detail["confirm"]]
        assert len(confirms) <= 1, confirms
