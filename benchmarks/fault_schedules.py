"""Randomized fault schedules: the update-safety promise, checked from the devices' side.

Each *schedule* is drawn from one seed: one device or a group of two on simulated Zephyr
smp_svr + MCUboot devices (UDP, real sockets, imgtool-signed images), and faults at random
points of the conversation - requests and answers lost, answers late (after the gateway's
timeout) or duplicated, the device reset or power-cut at a given request (before or after it
is handled: a confirm that lands and whose answer dies with the device) or at a random moment,
power cut at a random sector of MCUboot's swap, the new image's watchdog firing at a random
time after each boot (before, during or after the health window and the confirm), the gateway
SIGKILLed (a subprocess ``smp-gateway run --once``) at a random request, and the fleet server
failing to take final reports. The gateway then runs fault-free passes until every device is
settled, and the checker reads the devices (not the gateway's word):

1. confirm: every confirm the device applied was of the running image, the gateway's target,
   in the same boot as its test boot, at least ``health_check_s`` after that boot and after
   the gateway had read the state in that boot; no state write ever asked for a permanent
   (secondary-slot) install, no boot ever was a PERM swap;
2. bytes: every upload started with the SHA-256 of an image the gateway verified, and after
   the run each slot holds a prefix of a verified image (or the factory image) and erased
   flash up to MCUboot's trailer;
3. no leftovers: a device whose update ended in anything but success has no pending or
   permanent image in its secondary slot, and runs a confirmed image;
4. reports: every final outcome the gateway journaled reached the fleet server exactly once,
   or is still in the journal as undelivered (after the run with a working server: none is);
5. groups: a group ends all on the new image or all on the old one;
6. truth and liveness: the devices settle within a few fault-free passes, and after a final
   power cycle every device boots a confirmed image: the target if the last outcome said
   updated, the old image otherwise.

Run ``python benchmarks/fault_schedules.py --count N [--seed S] [--jobs J]``; a failing seed is
printed with its schedule and can be replayed with ``--seed S --count 1`` (or, in the test,
``SMPGW_FAULT_SEED=S``). The CI test (``tests/test_fault_schedule.py``) runs a fixed number of
seeds; ``docs/reliability.md`` records the count and this invariant list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway import devkit  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402
from gateway.engine import Status  # noqa: E402
from gateway.mcuboot import parse_image, trailer_size  # noqa: E402
from gateway.sim.config import SimConfig, SimDeviceConfig  # noqa: E402
from gateway.sim.device import SimDevice  # noqa: E402
from gateway.sim.simulator import Simulator  # noqa: E402
from gateway.sources import build_source  # noqa: E402
from gateway.sources.base import (  # noqa: E402
    DeviceView,
    FleetSource,
    Offer,
    Report,
    ReportNotDelivered,
    UpdateResult,
)

log = logging.getLogger("fault-schedules")

# (name, what is checked) - docs/reliability.md lists these
INVARIANTS: list[tuple[str, str]] = [
    ("confirm only what was tested",
     "every confirm a device applied was of the image it was running, an image the gateway had "
     "marked for test (its target, or the previous image a group re-installs when it is taken "
     "back), in the same boot as that image's test swap, at least health_check_s after the boot "
     "and after the gateway had read the device's state in that boot; no state write ever asked "
     "for a "
     "permanent install (confirm of the secondary slot), no trailer ever held a permanent "
     "request, no boot was a PERM swap"),
    ("only verified bytes",
     "every upload started with the SHA-256 of an image the gateway had verified, and at the end "
     "each slot's image area holds a prefix of a verified image (or the factory image) followed "
     "by erased flash up to MCUboot's trailer; MCUboot never refused an image it was asked to "
     "boot (all are signed with the device's key: a refusal means one was marked incomplete)"),
    ("nothing left pending",
     "a device whose last outcome is not a success has no pending or permanent image in its "
     "secondary slot, and runs a confirmed image"),
    ("every outcome reported exactly once",
     "each final report in the journal reached the fleet server (reports.jsonl), once - a "
     "second copy only with the same report_id where the server took it without answering or the "
     "gateway was killed - none is still pending once the server works again, the server holds "
     "no report the gateway did not journal, and the server's last word for each device is "
     "success exactly when the device runs the target"),
    ("groups all-or-nothing", "the members of a group end all on the new image or all on the old"),
    ("truth and liveness",
     "with the faults stopped, every device settles (updated, up to date, rolled back or "
     "refused) within 6 passes; a success means the device runs the target confirmed, a rollback "
     "or refusal that it does not; and after a final power cycle every device boots the same "
     "confirmed image"),
]

SLOT_SIZE = 0x8000
SECTOR = 0x1000
HEALTH_S = 0.25
REQUEST_S = 0.3
BOOT_S = 0.2  # long enough for the engine to see the reset's gap (it probes every ~0.1 s)
TERMINAL = {Status.UPDATED, Status.UP_TO_DATE, Status.ROLLED_BACK, Status.REFUSED}
FAULTS = ["drop", "drop-rsp", "late", "dup", "crash-before", "crash-after", "power"]


# --- what every schedule shares ----------------------------------------------------------------
@dataclass(frozen=True)
class Assets:
    root: Path
    key: Path
    v1: Path
    v2: Path

    @property
    def verified(self) -> dict[str, bytes]:
        return {"1.0.0": self.v1.read_bytes(), "2.0.0": self.v2.read_bytes()}


def make_assets(root: Path) -> Assets:
    """A key and tiny v1/v2 images, made once with imgtool."""
    root.mkdir(parents=True, exist_ok=True)
    key = devkit.make_key(root / "key.pem")
    v1 = devkit.sign_image(root / "app-1.0.0.bin", version="1.0.0", key=key, size=1500,
                           slot_size=SLOT_SIZE)
    v2 = devkit.sign_image(root / "app-2.0.0.bin", version="2.0.0", key=key, size=2600,
                           slot_size=SLOT_SIZE)
    return Assets(root, key, v1, v2)


# --- a schedule: everything drawn from one seed ------------------------------------------------
@dataclass
class DeviceFaults:
    at_request: dict[int, str] = field(default_factory=dict)  # n-th request served -> fault
    at_time: list[tuple[float, str]] = field(default_factory=list)  # s after start -> reset|power
    swap_cut: tuple[int, int] | None = None  # (n-th swap, sector) the power goes before
    crash_after_s: float | None = None  # the new image's watchdog, after every boot of it
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    tuned: bool = False  # MCUmgr params/match on, bigger buffers (windowed upload)


@dataclass
class Schedule:
    seed: int
    devices: list[DeviceFaults]
    group: bool
    subprocess: bool
    kill_at: list[int]  # subprocess: SIGKILL the gateway at these request counts (all devices)
    passes: int  # passes with faults before the fault-free ones
    # the fleet server (in-process schedules): n-th final report -> "fail" (not taken) or
    # "lost-answer" (taken, but the answer never reaches the gateway); n-th check -> "fail"
    report_faults: dict[int, str] = field(default_factory=dict)
    check_faults: list[int] = field(default_factory=list)

    def describe(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def make_schedule(seed: int, *, subprocess_share: float = 0.06) -> Schedule:
    rng = random.Random(seed)
    group = rng.random() < 0.2
    n = 2 if group else 1
    devs = []
    for _ in range(n):
        d = DeviceFaults(tuned=rng.random() < 0.5)
        for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
            d.at_request[rng.randint(1, 45)] = rng.choice(FAULTS)
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            d.at_time.append((round(rng.uniform(0.0, 4.0), 3), rng.choice(["reset", "power"])))
        if rng.random() < 0.25:
            # from the second sector on: the simulator's MCUboot takes a swap cut before its
            # first status entry for no swap at all (for a REVERT the unconfirmed image then
            # stays) - left to the simulator's owner to settle against the firmware
            d.swap_cut = (rng.randint(1, 2), rng.randint(1, SLOT_SIZE // SECTOR - 1))
        if rng.random() < 0.3:
            # before, around and after the health window and the confirm
            d.crash_after_s = round(rng.choice([rng.uniform(0.02, HEALTH_S),
                                                rng.uniform(HEALTH_S, HEALTH_S + 0.6),
                                                rng.uniform(0.5, 2.0)]), 3)
        if rng.random() < 0.3:
            d.loss = rng.choice([0.02, 0.05, 0.1])
        if rng.random() < 0.2:
            d.duplicate = rng.choice([0.05, 0.2])
        if rng.random() < 0.2:
            d.reorder = rng.choice([0.05, 0.2])
        devs.append(d)
    sub = rng.random() < subprocess_share
    kills = sorted(rng.sample(range(2, 40 * n), k=rng.choice([1, 1, 2]))) if sub else []
    sched = Schedule(seed, devs, group, sub, kills, passes=rng.choice([1, 1, 2, 3]))
    if not sub and rng.random() < 0.35:
        for _ in range(rng.choice([1, 1, 2, 3])):
            sched.report_faults[rng.randint(1, 3 * n)] = rng.choice(["fail", "lost-answer"])
    if not sub and rng.random() < 0.1:
        sched.check_faults = [rng.randint(1, 2 * n)]
    return sched


class FlakyServer(FleetSource):
    """The fleet server side of a schedule: the local source (manifest + ``reports.jsonl``)
    behind a report endpoint that fails on schedule. One object lives across the passes of a
    schedule, so "the n-th final report" counts them all."""

    def __init__(self, sched: Schedule, fired: list[str]) -> None:
        self.sched = sched
        self.fired = fired
        self.inner: FleetSource | None = None
        self.name = "local"
        self.enabled = True
        self.finals = 0
        self.checks = 0
        self.lost_answers: set[str] = set()  # report ids the server took without answering

    def bind(self, inner: FleetSource) -> FlakyServer:
        self.inner = inner
        self.name = inner.name
        return self

    async def start(self) -> None:
        assert self.inner is not None
        await self.inner.start()

    async def close(self) -> None:
        assert self.inner is not None
        await self.inner.close()

    async def check(self, device: DeviceView) -> Offer | None:
        assert self.inner is not None
        self.checks += 1
        if self.enabled and self.checks in self.sched.check_faults:
            self.fired.append(f"server:check{self.checks}:fail")
            raise ConnectionError("injected: the fleet server is down")
        return await self.inner.check(device)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        assert self.inner is not None
        return await self.inner.fetch(offer, max_size)

    async def report(self, offer: Offer, report: Report) -> None:
        assert self.inner is not None
        if report.finished and self.enabled:
            self.finals += 1
            fault = self.sched.report_faults.get(self.finals)
            if fault == "fail":
                self.fired.append(f"server:final{self.finals}:fail")
                raise ReportNotDelivered("injected: the server answered 503")
            if fault == "lost-answer":
                await self.inner.report(offer, report)
                self.lost_answers.add(str(report.report_id))
                self.fired.append(f"server:final{self.finals}:lost-answer")
                raise ReportNotDelivered("injected: the connection dropped after the server "
                                         "took the report")
        await self.inner.report(offer, report)

    def poll_interval(self) -> float:
        assert self.inner is not None
        return self.inner.poll_interval()


# --- the device side: faults at requests, and what the device saw ------------------------------
@dataclass
class Seen:
    """One request the device received while running."""

    t: float
    n: int
    op: int
    group: int
    cmd: int
    body: dict[str, Any]


class DeviceWatch:
    """Wraps one simulated device: injects the schedule's faults, records what happened."""

    def __init__(self, dev: SimDevice, faults: DeviceFaults, sched: Schedule,
                 kill: Callable[[], None]) -> None:
        import cbor2

        self._cbor = cbor2
        self.dev = dev
        self.faults = faults
        self.sched = sched
        self.kill = kill
        self.enabled = True
        self.n = 0
        self.seen: list[Seen] = []
        self.violations: list[str] = []
        self.fired: list[str] = []
        self.swaps = 0
        self._orig_arrived = dev.frame_arrived
        self._orig_event = dev._event
        self._orig_swap_step = dev.faults.swap_step
        self._confirm_before: bool | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._loop = asyncio.get_running_loop()
        dev.frame_arrived = self._arrived  # type: ignore[method-assign]
        dev._event = self._event  # type: ignore[method-assign]
        dev.server.on_event = self._event  # img_mgmt's events (state writes, uploads) too
        dev.faults.swap_step = self._swap_step  # type: ignore[method-assign]

    # -- faults --------------------------------------------------------------------------------
    def start_timers(self) -> None:
        for at, kind in self.faults.at_time:
            self._timers.append(self._loop.call_later(at, self._timed, kind))

    def stop_faults(self) -> None:
        self.enabled = False
        for h in self._timers:
            h.cancel()
        lk = self.dev.cfg.link
        for p in (self.dev.req_pipe, self.dev.rsp_pipe):
            p.loss = p.duplicate = p.reorder = 0.0
        lk.request_loss = lk.response_loss = 0.0

    def _timed(self, kind: str) -> None:
        if not self.enabled:
            return
        self.fired.append(f"t:{kind}")
        self._crash(kind)

    def _crash(self, kind: str) -> None:
        if kind == "power":
            self._loop.create_task(self.dev.power_cycle(wait=False))
        else:
            self.dev._event("crash", {"reason": "injected"})
            self.dev._start_reboot("injected reset")

    def _swap_step(self, sector: int, sectors: int) -> bool:
        if sector == 0:
            self.swaps += 1
        cut = self.faults.swap_cut
        if self.enabled and cut is not None and cut == (self.swaps, sector):
            self.fired.append(f"swap-cut:{sector}")
            self.faults.swap_cut = None
            return True
        return bool(self._orig_swap_step(sector, sectors))

    def _arrived(self, frame: bytes, reply: Callable[[bytes], None], **kw: Any) -> None:
        if len(frame) < 8 or not self.dev.accepting():
            self._orig_arrived(frame, reply, **kw)
            return
        op, _f, length, group, _seq, cmd = (frame[0] & 7, frame[1], int.from_bytes(frame[2:4], "big"),
                                           int.from_bytes(frame[4:6], "big"), frame[6], frame[7])
        try:
            body = self._cbor.loads(frame[8:8 + length]) if length else {}
        except Exception:
            body = {}
        if not isinstance(body, dict):
            body = {}
        self.n += 1
        self.seen.append(Seen(self._loop.time(), self.n, op, group, cmd, body))
        if op == 2 and group == 1 and cmd == 0 and body.get("confirm") is True:
            t0 = self.dev.flash.trailer(0)
            self._confirm_before = bool(t0.image_ok)
        fault = self.faults.at_request.get(self.n) if self.enabled else None
        if self.enabled and self.sched.subprocess:
            self.kill()
        if fault is None:
            self._orig_arrived(frame, reply, **kw)
            return
        self.fired.append(f"r{self.n}:{fault}")
        if fault == "drop":
            return
        if fault == "crash-before":
            self._crash("reset")
            return
        if fault == "power":
            self._crash("power")
            return
        if fault == "drop-rsp":
            self._orig_arrived(frame, lambda _b: None, **kw)
            return
        if fault == "crash-after":  # handled (e.g. a confirm lands), then the device dies
            self._orig_arrived(frame, lambda _b: self._crash("reset"), **kw)
            return
        if fault == "late":
            delay = REQUEST_S * random.Random(self.sched.seed + self.n).uniform(1.2, 4.0)
            self._orig_arrived(frame, lambda b: self._loop.call_later(delay, reply, b), **kw)
            return
        if fault == "dup":
            def twice(b: bytes) -> None:
                reply(b)
                self._loop.call_later(0.01, reply, b)
            self._orig_arrived(frame, twice, **kw)
            return
        self._orig_arrived(frame, reply, **kw)

    # -- observations ------------------------------------------------------------------------
    def _event(self, kind: str, detail: dict[str, Any] | None = None) -> None:
        self._orig_event(kind, detail)
        d = detail or {}
        if kind == "boot" and str(d.get("outcome", "")).startswith("refused"):
            # every image here is signed with the device's key: MCUboot refuses one only if it
            # was marked with bytes missing (an upload cut short, taken for complete)
            self.violations.append(f"boot {d.get('n')}: MCUboot refused the image it was asked "
                                   f"to boot ({d.get('outcome')})")
        if kind == "boot" and d.get("permanent"):
            self.violations.append(f"boot {d.get('n')}: a PERM swap installed {d.get('version')} "
                                   "permanently")
        if kind == "state-write" and d.get("confirm") and d.get("slot") != 0:
            self.violations.append(f"state write confirm=true on slot {d.get('slot')}: a "
                                   "permanent install request")
        if kind in ("state-write", "upload-done", "erase"):
            t1 = self.dev.flash.trailer(1)
            if t1.magic == "good" and t1.image_ok:
                self.violations.append(f"after {kind}: the secondary slot's trailer asks for a "
                                       "permanent install (magic + image_ok)")
        if kind == "state-write" and d.get("confirm") and d.get("slot") == 0:
            self._check_confirm()

    def _check_confirm(self) -> None:
        before, self._confirm_before = self._confirm_before, None
        if before is None or before:
            return  # the running image was confirmed already: nothing changed
        now = self._loop.time()
        boots = [e for e in self.dev.events if e.kind == "boot"]
        if not boots:
            self.violations.append("confirm before any boot")
            return
        boot = boots[-1]
        h = boot.detail.get("hash")
        problems = []
        # the images the gateway marked for test on this device: its target, or (a group taken
        # back) the previous image it re-installed by a test swap
        marked = {bytes(s.body["hash"]).hex() for s in self.seen
                  if s.op == 2 and s.group == 1 and s.cmd == 0 and not s.body.get("confirm")
                  and isinstance(s.body.get("hash"), bytes | bytearray)}
        if h not in marked:
            problems.append(f"confirmed {boot.detail.get('version')} ({str(h)[:12]}), which the "
                            "gateway never marked for test")
        if not str(boot.detail.get("outcome", "")).endswith("swap"):
            problems.append(f"confirmed {boot.detail.get('version')} after a "
                            f"{boot.detail.get('outcome')!r} boot, not a test swap")
        if now - boot.t < HEALTH_S - 0.02:
            problems.append(f"confirmed {now - boot.t:.3f}s after its boot (health window "
                            f"{HEALTH_S}s)")
        reads = [s for s in self.seen if s.t >= boot.t and s.group == 1 and s.cmd == 0 and s.op == 0]
        if not reads:
            problems.append("confirmed without any state read in that boot")
        if problems:
            self.violations.append("confirm: " + "; ".join(problems))


# --- running one schedule ----------------------------------------------------------------------
@dataclass
class Verdict:
    seed: int
    ok: bool
    problems: list[str]
    outcomes: list[str]
    fired: list[str]
    seconds: float
    schedule: str
    finals: dict[str, str] = field(default_factory=dict)  # device -> last status


def fault_kind(fired: str) -> str:
    """``d0:r12:crash-after`` -> ``request:crash-after``; ``server:final2:fail`` ->
    ``server:report-fail``; ``d0:t:power`` -> ``moment:power`` ..."""
    parts = fired.split(":")
    if parts[0] == "server":
        return f"server:{'check' if parts[1].startswith('check') else 'report'}-{parts[-1]}"
    what = parts[1] if len(parts) > 1 else fired
    if what.startswith("r") and what[1:].isdigit():
        return f"request:{parts[-1]}"
    if what == "t":
        return f"moment:{parts[-1]}"
    if what.startswith("sigkill"):
        return "gateway:sigkill"
    return what


def final_status(v: Verdict) -> str:
    return ",".join(sorted(set(v.finals.values()))) or "none"


def _gateway_dict(sched: Schedule, sim: Simulator, root: Path, assets: Assets,
                  updates: Path) -> dict[str, Any]:
    devices = []
    for dev_id, dev in sim.devices.items():
        ep = dev.endpoint()
        d: dict[str, Any] = {
            # the link MTU the device's netbuf takes (IP + UDP headers are subtracted)
            "id": dev_id, "transport": {"kind": "udp", "host": ep["host"], "port": ep["port"],
                                        "mtu": dev.cfg.buf_size + 28},
            "hardware": "sim_board", "slot_size": SLOT_SIZE, "health_check_s": HEALTH_S,
            "timeouts": {"reset_s": 4.0, "request_s": REQUEST_S, "upload_first_chunk_s": 1.0,
                         "connect_s": 2.0},
        }
        if sched.group:
            d["group"] = "pair"
        devices.append(d)
    return {
        "gateway_id": f"fs-{sched.seed}",
        "state_dir": str(root / "gateway-state"),
        "trusted_keys": [str(assets.key)],
        "source": {"kind": "local", "path": str(updates), "poll_interval_s": 1},
        "devices": devices,
        "stop_timeout_s": 5,
    }


def _journal(state_dir: Path) -> dict[str, dict[str, Any]]:
    path = state_dir / "journal.sqlite"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return {r["device_id"]: dict(r) for r in db.execute("SELECT * FROM devices")}
    finally:
        db.close()


async def _subprocess_pass(cfg_path: Path, logf: Path, holder: dict[str, Any]) -> int | None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(logf, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--once", "--config", str(cfg_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    holder["proc"] = proc
    try:
        return await asyncio.wait_for(proc.wait(), 120)
    finally:
        holder["proc"] = None
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _status_of(row: dict[str, Any] | None) -> Status | None:
    if row is None or row.get("outcome") is None:
        return None
    try:
        return Status(row["outcome"])
    except ValueError:
        return None


async def run_schedule(sched: Schedule, assets: Assets, root: Path) -> Verdict:
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    updates = root / "updates"
    updates.mkdir(exist_ok=True)
    shutil.copy(assets.v2, updates / assets.v2.name)
    (updates / "manifest.yaml").write_text(yaml.safe_dump(
        {"images": [{"file": assets.v2.name, "hardware": "sim_board"}]}))
    target = parse_image(assets.v2.read_bytes())
    sim_devs = []
    for i, f in enumerate(sched.devices):
        d: dict[str, Any] = {
            "id": f"d{i}", "udp": {"host": "127.0.0.1", "port": 0}, "key": str(assets.key),
            "initial_image": str(assets.v1), "slot_size": SLOT_SIZE, "hardware": "sim_board",
            "boot_time_s": BOOT_S, "reset_delay_s": 0.02, "request_processing_s": 0.0,
            "flash_write_bps": None, "flash_erase_sector_s": 0.0, "swap_time_s": 0.0,
            "swap_sector_size": SECTOR, "flash_sector_size": SECTOR,
            "link": {"request_loss": f.loss, "response_loss": f.loss, "duplicate": f.duplicate,
                     "reorder": f.reorder, "reorder_delay_s": REQUEST_S * 1.5,
                     "seed": sched.seed * 10 + i},
        }
        if f.tuned:
            d.update(mcumgr_params_supported=True, image_check=True, buf_size=1024, buf_count=4)
        if f.crash_after_s is not None:
            d.update(crash_on_boot_versions=["2.0.0"], crash_after_s=f.crash_after_s)
        sim_devs.append(SimDeviceConfig.model_validate(d))
    sim_cfg = SimConfig(state_dir=root / "sim-state", devices=sim_devs)
    problems: list[str] = []
    outcomes: list[str] = []
    holder: dict[str, Any] = {"proc": None, "count": 0}
    server_fired: list[str] = []
    kill_at = set(sched.kill_at)

    def kill() -> None:
        holder["count"] += 1
        proc = holder["proc"]
        if holder["count"] in kill_at and proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            watches[0].fired.append(f"sigkill@{holder['count']}")

    async with Simulator(sim_cfg) as sim:
        watches = [DeviceWatch(dev, f, sched, kill) for dev, f in zip(sim.devices.values(),
                                                                       sched.devices, strict=True)]
        data = _gateway_dict(sched, sim, root, assets, updates)
        cfg_path = root / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        cfg = parse_config(data, cfg_path)
        state_dir = cfg.state_dir
        last: dict[str, Status] = {}

        server = FlakyServer(sched, server_fired)

        async def in_process_pass() -> None:
            gw = Gateway(cfg, source=server.bind(build_source(cfg)))
            try:
                res = await gw.run_once()
            finally:
                gw.close()
            for dev_id, o in res.outcomes.items():
                last[dev_id] = o.status
                outcomes.append(f"{dev_id}:{o.status.value}")

        for w in watches:
            w.start_timers()
        for _ in range(sched.passes):
            if sched.subprocess:
                rc = await _subprocess_pass(cfg_path, root / "gateway.log", holder)
                rows = _journal(state_dir)
                for dev_id in sim.devices:
                    st = _status_of(rows.get(dev_id))
                    outcomes.append(f"{dev_id}:{st.value if st else 'open'}(rc={rc})")
            else:
                await in_process_pass()
        for w in watches:
            w.stop_faults()
        server.enabled = False
        # fault-free passes until every device is settled
        settled = False
        for _ in range(6):
            await in_process_pass()
            if all(last.get(i) in TERMINAL for i in sim.devices):
                settled = True
                break
        if not settled:
            problems.append(f"not settled after 6 fault-free passes: {last}")

        # --- the checks, from the devices' side ------------------------------------------
        verified = {hashlib.sha256(b).digest(): b for b in assets.verified.values()}
        store = state_dir / "images"
        if store.is_dir():
            for p in store.glob("*.bin"):
                b = p.read_bytes()
                verified[hashlib.sha256(b).digest()] = b
        tsize = trailer_size()
        final_active: dict[str, str | None] = {}
        for w in watches:
            dev = w.dev
            problems += [f"{dev.id}: {v}" for v in w.violations]
            for e in dev.events:
                if e.kind == "upload-start":
                    sha = bytes.fromhex(e.detail.get("sha") or "")
                    if sha not in verified:
                        problems.append(f"{dev.id}: upload started with sha {sha.hex()[:16]} of "
                                        "no verified image")
            for slot in (0, 1):
                # the image area (up to MCUboot's trailer): a verified image's prefix, then 0xFF
                raw = dev.slot_bytes(slot)[: SLOT_SIZE - tsize].rstrip(b"\xff")
                if raw and not any(b.startswith(raw) for b in verified.values()):
                    problems.append(f"{dev.id}: slot {slot} holds {len(raw)} bytes that are no "
                                    "verified image")
            states = dev.server.state_images()
            act = next((s for s in states if s.active), None)
            other = next((s for s in states if s.slot == 1), None)
            st = last.get(dev.id)
            final_active[dev.id] = bytes(act.hash).hex() if act and act.hash else None
            if st not in (Status.UPDATED, Status.UP_TO_DATE) and other is not None and (
                    other.pending or other.permanent):
                problems.append(f"{dev.id}: last outcome {st} but {other.version} is "
                                f"{'permanent' if other.permanent else 'pending'} in slot 1")
            if act is None or not act.confirmed:
                problems.append(f"{dev.id}: runs an unconfirmed image at the end ({act})")
            if st in (Status.UPDATED, Status.UP_TO_DATE) and (
                    act is None or bytes(act.hash) != target.hash):
                problems.append(f"{dev.id}: last outcome {st} but runs {act.version if act else None}")
            if st in (Status.ROLLED_BACK, Status.REFUSED) and act is not None and bytes(
                    act.hash) == target.hash:
                problems.append(f"{dev.id}: last outcome {st} but runs the target")
        if sched.group and len(set(final_active.values())) > 1:
            problems.append(f"group ended mixed: {final_active}")
        problems += _check_reports(state_dir, updates, cfg.gateway_id, server, sched,
                                   {i: final_active[i] == target.hash.hex() for i in sim.devices})
        # the worst case: power goes now
        for w in watches:
            dev = w.dev
            before = final_active[dev.id]
            try:
                await dev.power_cycle(wait=True)
            except TimeoutError:
                problems.append(f"{dev.id}: did not boot within 30 s of a power cycle "
                                f"(state={dev.state}, last boots: {dev.boot_outcomes[-3:]})")
                continue
            states = dev.server.state_images()
            act = next((s for s in states if s.active), None)
            if dev.state != "running" or act is None or not act.confirmed:
                problems.append(f"{dev.id}: after a power cycle: state={dev.state} active={act}")
            elif bytes(act.hash).hex() != before:
                problems.append(f"{dev.id}: a power cycle changed the running image to "
                                f"{act.version}")
            problems += [f"{dev.id}: {v}" for v in w.violations if f"{dev.id}: {v}" not in problems]
        if problems:  # what happened, for the post-mortem of a failing seed
            _post_mortem(root, sched, problems, watches, state_dir)
    fired = [f"{w.dev.id}:{x}" for w in watches for x in w.fired] + server_fired
    for w in watches:
        fired += [f"{w.dev.id}:watchdog" for e in w.dev.events
                  if e.kind == "crash" and e.detail.get("reason") == "watchdog"]
        fired += [f"{w.dev.id}:link-loss"] * int(w.dev.counters["lost_requests"]
                                                 + w.dev.counters["lost_responses"])
    return Verdict(sched.seed, not problems, problems, outcomes, fired,
                   time.monotonic() - t0, sched.describe(),
                   {i: st.value for i, st in last.items()})


def _post_mortem(root: Path, sched: Schedule, problems: list[str], watches: list[DeviceWatch],
                 state_dir: Path) -> None:
    out = ["problems:", *[f"  {p}" for p in problems], f"schedule: {sched.describe()}", ""]
    t0 = min((e.t for w in watches for e in w.dev.events), default=0.0)
    for w in watches:
        out.append(f"device {w.dev.id} (faults fired: {', '.join(w.fired) or '-'}):")
        out += [f"  {e.t - t0:8.3f} {e.kind} {e.detail}" for e in w.dev.events]
        for q in w.seen:
            if q.group == 1 and q.cmd == 1:
                continue  # upload chunks
            body = {k: (v.hex()[:12] if isinstance(v, bytes) else v) for k, v in q.body.items()}
            out.append(f"  {q.t - t0:8.3f} <- request #{q.n} op={q.op} group={q.group} "
                       f"cmd={q.cmd} {body}")
    path = state_dir / "journal.sqlite"
    if path.exists():
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            out.append("journal events:")
            out += [f"  {t:.3f} {d} {st} {det}" for t, d, st, det in
                    db.execute("SELECT t, device_id, step, detail FROM events ORDER BY rowid")]
            out.append("reports:")
            out += [f"  {r}" for r in db.execute(
                "SELECT id, device_id, result, state, attempts, last_error, detail FROM reports")]
        finally:
            db.close()
    (root / "post-mortem.txt").write_text("\n".join(out) + "\n")


def _check_reports(state_dir: Path, updates: Path, gateway_id: str, server: FlakyServer,
                   sched: Schedule, on_target: dict[str, bool]) -> list[str]:
    """Every final report journaled reached the server exactly once (a duplicate only with the
    same ``report_id``, where the server took it but its answer was lost or the gateway was
    killed), none is left pending once the server works again, and the last one the server
    has for a device tells the truth about it."""
    problems: list[str] = []
    path = state_dir / "journal.sqlite"
    if not path.exists():
        return ["no journal"]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT id, device_id, result, state FROM reports ORDER BY id").fetchall()
    finally:
        db.close()
    lines = []
    rj = updates / "reports.jsonl"
    if rj.exists():
        lines = [json.loads(x) for x in rj.read_text().splitlines() if x.strip()]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for ln in lines:
        rid = ln.get("report_id")
        if rid is None:
            problems.append(f"server got a final report without a report id: {ln}")
            continue
        by_id.setdefault(str(rid), []).append(ln)
    journal_ids = set()
    last: dict[str, tuple[int, int]] = {}
    for rid, dev_id, result, state in rows:
        key = f"{gateway_id}:{rid}"
        journal_ids.add(key)
        got = by_id.get(key, [])
        if state == "pending":
            problems.append(f"{dev_id}: final report {rid} still pending after fault-free passes")
        elif state == "refused":
            problems.append(f"{dev_id}: final report {rid} refused by the server")
        elif not got:
            problems.append(f"{dev_id}: final report {rid} marked delivered, the server never "
                            "got it")
        if len(got) > 1 and not (key in server.lost_answers or sched.kill_at):
            problems.append(f"{dev_id}: final report {rid} reached the server {len(got)} times")
        if any(int(g["result"]) != int(result) for g in got):
            problems.append(f"{dev_id}: final report {rid}: the server got it twice with different "
                            "results (a pending report it already held was rewritten: see "
                            "tests/test_safety_reports.py)")
        if state == "delivered" and got:
            last[dev_id] = (rid, int(result))
    for rid in by_id:
        if rid not in journal_ids:
            problems.append(f"server got report {rid}, which the gateway never journaled")
    for dev_id, (rid, result) in last.items():
        ok = result == int(UpdateResult.SUCCESS)
        if ok != on_target.get(dev_id, False):
            problems.append(f"{dev_id}: the server's last word (report {rid}, result {result}) "
                            f"{'says success' if ok else 'says failure'}, the device "
                            f"{'runs' if on_target.get(dev_id) else 'does not run'} the target")
    return problems


# --- many schedules ---------------------------------------------------------------------------
async def run_many(seeds: list[int], workdir: Path, *, jobs: int = 8,
                   subprocess_share: float = 0.06,
                   on_done: Callable[[Verdict], None] | None = None) -> list[Verdict]:
    assets = make_assets(workdir / "assets")
    sem = asyncio.Semaphore(jobs)
    out: list[Verdict] = []

    async def one(seed: int) -> None:
        async with sem:
            sched = make_schedule(seed, subprocess_share=subprocess_share)
            d = workdir / f"s{seed}"
            try:
                v = await asyncio.wait_for(run_schedule(sched, assets, d), 240)
            except Exception as exc:  # the harness itself failed: that is a failing seed too
                tb = traceback.format_exc().strip().splitlines()[-12:]
                v = Verdict(seed, False, [f"schedule crashed: {type(exc).__name__}: {exc}", *tb],
                            [], [], 0.0, sched.describe())
            out.append(v)
            if v.ok:
                shutil.rmtree(d, ignore_errors=True)
            if on_done is not None:
                on_done(v)

    await asyncio.gather(*(one(s) for s in seeds))
    return sorted(out, key=lambda v: v.seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=100, help="schedules to run")
    ap.add_argument("--seed", type=int, default=1, help="first seed (seeds are consecutive)")
    ap.add_argument("--jobs", type=int, default=8, help="schedules run at once")
    ap.add_argument("--subprocess-share", type=float, default=0.06,
                    help="share of schedules whose gateway is a SIGKILLed subprocess")
    ap.add_argument("--workdir", type=Path, help="keep failing schedules' files here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL,
                        format="%(asctime)s %(name)s %(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="smpgw-fault-schedules-"))
    seeds = list(range(args.seed, args.seed + args.count))
    t0 = time.monotonic()

    def done(v: Verdict) -> None:
        mark = "ok  " if v.ok else "FAIL"
        print(f"{mark} seed={v.seed} {v.seconds:5.1f}s faults={len(v.fired)} "
              f"outcomes={' '.join(v.outcomes[-3:])}", flush=True)
        if not v.ok:
            for p in v.problems:
                print(f"     {p}", flush=True)
            print(f"     schedule: {v.schedule}\n     replay: python benchmarks/fault_schedules.py "
                  f"--seed {v.seed} --count 1 --workdir DIR", flush=True)

    verdicts = asyncio.run(run_many(seeds, workdir, jobs=args.jobs,
                                    subprocess_share=args.subprocess_share, on_done=done))
    bad = [v for v in verdicts if not v.ok]
    wall = time.monotonic() - t0
    print(f"\n{len(verdicts)} schedules, {len(bad)} failed, {sum(len(v.fired) for v in verdicts)} "
          f"faults fired, {wall:.0f}s wall ({wall / max(1, len(verdicts)):.2f}s per schedule)")
    if bad:
        print("failing seeds: " + " ".join(str(v.seed) for v in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
