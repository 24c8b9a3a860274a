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

New actors, switched on with ``--actors all|operator,device,server`` (``SMPGW_FAULT_ACTORS``) and
drawn from ``seed ^ ACTOR_SALT``: operators (cancel, pause, resume, unblock, update, restart,
the maintenance window opening and closing - at random moments or right after a step),
hostile devices (no progress, ENOMEM forever, rewinds, state reads that replay an older one)
and hostile servers (lying dfu_application.zip fields, a zip bomb, a link outside the update
directory, outages); their invariants are ``NEW_INVARIANTS`` (the attempt bound and the memory
ceiling are checked in every schedule).

Run ``python benchmarks/fault_schedules.py --count N [--seed S] [--jobs J]``; a failing seed is
printed with its schedule and can be replayed with ``--seed S --count 1`` (or, in the test,
``SMPGW_FAULT_SEED=S``). The CI test (``tests/test_fault_schedule.py``) runs a fixed number of
seeds; ``docs/reliability.md`` records the count and this invariant list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import random
import resource
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
import zipfile
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
from gateway.control import ControlError  # noqa: E402
from gateway.daemon import Gateway  # noqa: E402
from gateway.engine import Status  # noqa: E402
from gateway.mcuboot import parse_image, trailer_size  # noqa: E402
from gateway.sim.config import SimConfig, SimDeviceConfig  # noqa: E402
from gateway.sim.device import SimDevice  # noqa: E402
from gateway.sim.simulator import Simulator  # noqa: E402
from gateway.smp.reboot import GONE_PROBE_S  # noqa: E402
from gateway.sources import build_source  # noqa: E402
from gateway.sources.base import (  # noqa: E402
    DeviceView,
    FetchError,
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
TIMEOUTS = {"reset_s": 4.0, "request_s": REQUEST_S, "upload_first_chunk_s": 1.0, "connect_s": 2.0}
FAULTS = ["drop", "drop-rsp", "late", "dup", "crash-before", "crash-after", "power"]

# --- the new actors (switchable: ``actors=`` / ``--actors`` / ``SMPGW_FAULT_ACTORS``) ------------
# drawn from ``random.Random(seed ^ ACTOR_SALT)``, so a seed's older draws stay as they were
ACTORS = ("operator", "device", "server")
ACTOR_SALT = 0x0AC7_0125
# operator actions at random moments: "cancel" is what the operator guide says (pause, then
# cancel: no retry); "window" opens or closes the maintenance window; "restart" drops the
# gateway mid-pass (its task is cancelled) and a new Gateway starts on the same state_dir
OPS = ["cancel", "cancel", "pause", "resume", "unblock", "update", "restart", "restart", "window"]
# an operator action may be anchored to a step of the update instead of a moment: it comes
# (0-0.4 s) after the gateway first reports that step for the device in a pass with faults
ANCHORS = ["upload", "mark-test", "reset", "wait-boot", "verify", "confirm"]
HOSTILE_DEVICE = ["no-progress", "enomem", "rewind", "contradict"]
HOSTILE_SERVER = ["netcore-tag", "lie-meta", "zip-bomb", "foreign-link", "outage"]
# the schedule's maintenance window ("night", 03:00-04:00 UTC): the policy's clock reads one of
# these two moments, as the schedule opens and closes it
WINDOW_OPEN_AT = dt.datetime(2026, 1, 1, 3, 30, tzinfo=dt.UTC)
WINDOW_CLOSED_AT = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
MEM_CEILING_MB = 600  # peak RSS of the process running the gateways (iv)
WINDOW_GRACE_S = 2 * REQUEST_S + 0.1  # a reset sent as the window closed may arrive this late
CANCEL_GRACE_S = 0.1  # a confirm already on its way when the cancel was acknowledged
NEW_INVARIANTS: list[tuple[str, str]] = [
    ("nothing pending after a cancel",
     "after the faults stop and the window opens, a device whose update the operator canceled "
     "(pause + cancel, acknowledged by the control API) runs a confirmed image and has no "
     "pending image in its secondary slot, and its journal holds no unfinished cancel"),
    ("no reset outside a window",
     "no reset request and no test mark reached a device while its maintenance window was "
     "closed (the harness moves the policy's clock; a request may trail the closing by "
     f"{WINDOW_GRACE_S:.1f} s)"),
    ("every attempt ends within its bound",
     "every attempt (``Gateway.attempt`` of a unit) ends within a bound computed from the "
     "device's timeouts (connect, first chunk, reset, health check, request), also against "
     "devices that answer without progress, ENOMEM forever or rewind"),
    ("memory bounded",
     f"the peak RSS of the process running the gateways stays below {MEM_CEILING_MB} MB (zip "
     "bombs whose central directory lies included)"),
    ("an operator's cancel survives a restart",
     "once a cancel was acknowledged, the canceled image is never confirmed on that device "
     "(unless the operator resumed it later), whether or not the gateway restarted in between; "
     "an image offered by a link outside the update directory is never uploaded"),
]


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
    # the hostile server's: a newer, validly signed image it links from outside its directory
    devkit.sign_image(root / "foreign" / "app-3.0.0.bin", version="3.0.0", key=key, size=2000,
                      slot_size=SLOT_SIZE)
    return Assets(root, key, v1, v2)


BOMB_BYTES = 64 << 20  # what the zip bomb inflates to; its central directory says 2600


def _dfu_zip(files: list[tuple[str, bytes, dict[str, Any]]]) -> bytes:
    """A dfu_application.zip: ``manifest.json`` listing ``files`` (name, bytes, extra fields)."""
    buf = io.BytesIO()
    man = {"format-version": 1, "name": "fault-schedules",
           "files": [{"file": n, "size": len(b), **extra} for n, b, extra in files]}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(man))
        for n, b, _ in files:
            zf.writestr(n, b)
    return buf.getvalue()


def _zip_bomb(claimed: int) -> bytes:
    """A tiny deflate bomb: ``app.bin`` inflates to BOMB_BYTES while both its local header and
    the central directory say ``claimed`` bytes (the manifest agrees with the lie)."""
    buf = io.BytesIO()
    man = {"format-version": 1, "files": [{"file": "app.bin", "image_index": "0",
                                           "size": claimed}]}
    info = zipfile.ZipInfo("app.bin", (1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(man))
        with zf.open(info, "w") as f:
            chunk = bytes(1 << 20)
            for _ in range(BOMB_BYTES >> 20):
                f.write(chunk)
    data = bytearray(buf.getvalue())
    real, fake = BOMB_BYTES.to_bytes(4, "little"), claimed.to_bytes(4, "little")
    # the uncompressed size: offset 22 of the local header, 24 of the central directory entry
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = data.find(sig)
        while i >= 0:
            if data[i + off:i + off + 4] == real:
                data[i + off:i + off + 4] = fake
            i = data.find(sig, i + 4)
    return bytes(data)


def write_manifest(sched: Schedule, assets: Assets, updates: Path) -> None:
    """The update directory the schedule's (possibly lying) server serves."""
    shutil.copy(assets.v2, updates / assets.v2.name)
    entries: list[dict[str, Any]] = [{"file": assets.v2.name, "hardware": "sim_board"}]
    v2 = assets.v2.read_bytes()
    for lie in sched.server_lies:
        if lie == "netcore-tag":  # image 0 labelled an nRF5340 network core: no test, no revert
            (updates / "dfu_application.zip").write_bytes(_dfu_zip([("app.bin", v2, {
                "image_index": "0", "netcore": True, "board": "nrf5340dk_nrf5340_cpunet"})]))
            entries = [{"file": "dfu_application.zip", "hardware": "sim_board"}]
        elif lie == "lie-meta":  # version, board, hardware and load address that are not so
            (updates / "dfu_application.zip").write_bytes(_dfu_zip([("app.bin", v2, {
                "image_index": "0", "version_MCUBOOT": "9.9.9+0", "board": "other_board",
                "load_address": "0x12345"})]))
            entries = [{"file": "dfu_application.zip", "hardware": "sim_board"}]
        elif lie == "zip-bomb":
            (updates / "bomb.zip").write_bytes(_zip_bomb(len(v2)))
            entries.insert(0, {"file": "bomb.zip", "hardware": "sim_board"})
        elif lie == "foreign-link":  # a newer signed image, outside the update directory
            rel = os.path.relpath(assets.root / "foreign" / "app-3.0.0.bin", updates)
            entries.insert(0, {"file": rel, "hardware": "sim_board"})
    (updates / "manifest.yaml").write_text(yaml.safe_dump({"images": entries}))


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
    # the new actors (empty unless switched on and drawn; in-process schedules only)
    actors: list[str] = field(default_factory=list)
    ops: list[tuple[float, str, int]] = field(default_factory=list)  # (s after start, op, dev)
    window: bool | None = None  # None: no maintenance window; else: open at the start?
    hostile: dict[int, tuple[str, int]] = field(default_factory=dict)  # dev -> (kind, from chunk)
    server_lies: list[str] = field(default_factory=list)
    outage: tuple[float, float] | None = None  # (s after start, length): the server is down

    def describe(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def make_schedule(seed: int, *, subprocess_share: float = 0.06,
                  actors: frozenset[str] | set[str] = frozenset()) -> Schedule:
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
    if actors and not sub:
        _draw_actors(sched, random.Random(seed ^ ACTOR_SALT), set(actors))
    return sched


def _draw_actors(sched: Schedule, ar: random.Random, actors: set[str]) -> None:
    """The new actors; every draw is made whichever actors are on, so a seed draws the same
    operator actions with or without hostile devices."""
    n = len(sched.devices)
    op_on = ar.random() < 0.6
    window = (ar.random() < 0.5) if ar.random() < 0.5 else None
    ops = []
    for _ in range(ar.choice([1, 2, 3, 4])):
        kind = ar.choice(OPS)
        at, dev = round(ar.uniform(0.2, 4.0), 3), ar.randrange(n)
        if kind == "window" and window is None:
            kind = "cancel"
        if ar.random() < 0.6:  # anchored: "cancel@wait-boot" - ``at`` is then the delay
            kind, at = f"{kind}@{ar.choice(ANCHORS)}", round(ar.uniform(0.0, 0.4), 3)
        ops.append((at, kind, dev))
    dev_on = ar.random() < 0.35
    hostile = (ar.randrange(n), ar.choice(HOSTILE_DEVICE), ar.randint(1, 6))
    srv_on = ar.random() < 0.4
    lie = ar.choice(HOSTILE_SERVER)
    outage = (round(ar.uniform(0.0, 3.0), 3),
              round(ar.choice([ar.uniform(0.05, 0.5), ar.uniform(0.5, 3.0), ar.uniform(3.0, 30.0)]), 3))
    if "operator" in actors and op_on:
        sched.actors.append("operator")
        sched.window = window
        sched.ops = sorted(ops)
    if "device" in actors and dev_on:
        sched.actors.append("device")
        sched.hostile[hostile[0]] = (hostile[1], hostile[2])
    if "server" in actors and srv_on:
        sched.actors.append("server")
        if lie == "outage":
            sched.outage = outage
        else:
            sched.server_lies.append(lie)


def parse_actors(text: str | None) -> frozenset[str]:
    """``"all"``, ``""``/``"none"`` or a comma list of ACTORS."""
    text = (text or "").strip().lower()
    if text in ("", "none", "0"):
        return frozenset()
    if text == "all":
        return frozenset(ACTORS)
    got = frozenset(a.strip() for a in text.split(",") if a.strip())
    bad = got - set(ACTORS)
    if bad:
        raise ValueError(f"unknown actors {sorted(bad)}: choose from {', '.join(ACTORS)} or all")
    return got


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
        self.t0: float | None = None  # the schedule's start (loop time), for the outage

    def _down(self, what: str) -> bool:
        """Inside the schedule's outage (the server answers nothing useful)."""
        out = self.sched.outage
        if not self.enabled or out is None or self.t0 is None:
            return False
        now = asyncio.get_running_loop().time() - self.t0
        if out[0] <= now < out[0] + out[1]:
            tag = f"server:outage:{what}"
            if tag not in self.fired:
                self.fired.append(tag)
            return True
        return False

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
        if self._down("check"):
            raise ConnectionError("injected: fleet server outage")
        return await self.inner.check(device)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        assert self.inner is not None
        if self._down("fetch"):
            raise FetchError("injected: fleet server outage", UpdateResult.CONNECTION_LOST)
        return await self.inner.fetch(offer, max_size)

    async def report(self, offer: Offer, report: Report) -> None:
        assert self.inner is not None
        if self._down("report"):
            raise ReportNotDelivered("injected: fleet server outage")
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
                 kill: Callable[[], None], hostile: tuple[str, int] | None = None) -> None:
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
        self.hostile = hostile  # (kind, from the n-th upload chunk) - see HOSTILE_DEVICE
        self.chunks = 0
        self.reads = 0
        self.hostile_answers = 0
        self._last_read: bytes | None = None
        self.confirms: list[tuple[float, str | None]] = []  # (t, hash) of applied confirms
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
        if fault is None and self.hostile is not None and self.enabled:
            if self._hostile(frame, reply, op, group, cmd, body, kw):
                return
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

    def _rsp(self, frame: bytes, body: dict[str, Any]) -> bytes:
        """An SMP answer to ``frame`` (same group, sequence and command) carrying ``body``."""
        data = self._cbor.dumps(body)
        return (bytes([(frame[0] & ~7) | ((frame[0] & 7) + 1), frame[1]])
                + len(data).to_bytes(2, "big") + frame[4:8] + data)

    def _hostile(self, frame: bytes, reply: Callable[[bytes], None], op: int, group: int,
                 cmd: int, body: dict[str, Any], kw: dict[str, Any]) -> bool:
        """A hostile device (HOSTILE_DEVICE): True when the request was answered here."""
        assert self.hostile is not None
        kind, from_chunk = self.hostile
        if kind == "contradict" and op == 0 and group == 1 and cmd == 0:
            # a state read answered with the previous read's answer, every other time: what
            # the device says contradicts what it said (and did) since
            self.reads += 1
            if self.reads % 2 == 0 and self._last_read is not None:
                self._note_fired(f"hostile:{kind}")
                reply(self._last_read[:6] + frame[6:7] + self._last_read[7:])
                return True

            def keep(b: bytes) -> None:
                self._last_read = b
                reply(b)
            self._orig_arrived(frame, keep, **kw)
            return True
        if not (op == 2 and group == 1 and cmd == 1):
            return False
        self.chunks += 1
        if self.chunks <= from_chunk or not body.get("off"):
            return False  # a first chunk (offset 0) always goes through: the upload starts
        up = self.dev.server.upload
        if kind == "enomem":  # smp.c with no netbuf left, forever
            self._note_fired(f"hostile:{kind}")
            reply(self._rsp(frame, {"rc": 2}))
            return True
        if kind == "no-progress":  # the same offset again and again, nothing written
            self._note_fired(f"hostile:{kind}")
            reply(self._rsp(frame, {"rc": 0, "off": up.off}))
            return True
        if kind == "rewind":  # handled, but the answer takes half of it back, every time

            def back(b: bytes) -> None:
                reply(self._rsp(frame, {"rc": 0, "off": max(1, self.dev.server.upload.off // 2)}))
            self._note_fired(f"hostile:{kind}")
            self._orig_arrived(frame, back, **kw)
            return True
        return False

    def _note_fired(self, tag: str) -> None:
        self.hostile_answers += 1
        if tag not in self.fired:
            self.fired.append(tag)

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
        self.confirms.append((now, h))
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
    if parts[0] == "op":
        return f"operator:{parts[1]}"
    if parts[0] == "server" and parts[1] == "outage":
        return "server:outage"
    if len(parts) > 2 and parts[1] == "hostile":
        return f"hostile-device:{parts[2]}"
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
            "timeouts": dict(TIMEOUTS),
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
        **({"maintenance_windows": {"night": {"cron": "0 3 * * *", "duration_s": 3600}}}
           if sched.window is not None else {}),
    }


def attempt_bound(sched: Schedule) -> float:
    """How long one attempt of a unit may take, from the devices' timeouts (_gateway_dict):
    the link, the first chunk, every other chunk (each may time out and be sent again up to the
    upload's stall limit), resets (the test boot, a cancel's two), the health window and a
    handful of plain requests; a group runs its members' phases one after the other."""
    chunks = -(-2600 // 128)  # v2 in the smallest chunks a device here takes
    stalls = 8  # SMPUpload.max_stalls
    one = (TIMEOUTS["connect_s"] + TIMEOUTS["upload_first_chunk_s"]
           + (chunks + stalls) * 2 * TIMEOUTS["request_s"]
           + 3 * (GONE_PROBE_S + TIMEOUTS["reset_s"])  # gateway.smp.reboot.wait_reboot's bound
           + 2 * HEALTH_S + 30 * TIMEOUTS["request_s"])
    return round(one * (2 if sched.group else 1), 1)


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
    write_manifest(sched, assets, updates)
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
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    # the operators' side: the running gateway, what they did, the window's timeline
    cur: dict[str, Any] = {"gw": None, "task": None}
    op_log: list[tuple[float, str, str, bool, str]] = []  # (t, op, device, acknowledged, answer)
    cancels: list[tuple[float, str]] = []  # acknowledged cancels: (t, device)
    resumes: list[tuple[float, str]] = []  # the operator let the device update again
    win: dict[str, Any] = {"open": sched.window,
                           "log": [] if sched.window is None else [(t_start, sched.window)]}
    attempts: list[list[Any]] = []  # [unit, start, end or None, phase]
    op_tasks: list[asyncio.Task[None]] = []
    op_timers: list[asyncio.TimerHandle] = []

    def kill() -> None:
        holder["count"] += 1
        proc = holder["proc"]
        if holder["count"] in kill_at and proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            watches[0].fired.append(f"sigkill@{holder['count']}")

    def window_clock() -> dt.datetime:
        return WINDOW_OPEN_AT if win["open"] else WINDOW_CLOSED_AT

    def set_window(is_open: bool) -> None:
        if sched.window is not None and win["open"] != is_open:
            win["open"] = is_open
            win["log"].append((loop.time(), is_open))

    async with Simulator(sim_cfg) as sim:
        watches = [DeviceWatch(dev, f, sched, kill, sched.hostile.get(i))
                   for i, (dev, f) in enumerate(zip(sim.devices.values(), sched.devices,
                                                    strict=True))]
        data = _gateway_dict(sched, sim, root, assets, updates)
        cfg_path = root / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        cfg = parse_config(data, cfg_path)
        state_dir = cfg.state_dir
        last: dict[str, Status] = {}
        bound = attempt_bound(sched)

        server = FlakyServer(sched, server_fired)
        server.t0 = t_start

        anchored: dict[tuple[str, str], list[tuple[float, str]]] = {}
        for at, kind, i in sched.ops:
            if "@" in kind:
                op, step = kind.split("@")
                anchored.setdefault((f"d{min(i, len(watches) - 1)}", step), []).append((at, op))

        def progress(dev_id: str, step: str, off: int, total: int) -> None:
            if not watches[0].enabled or (step == "upload" and not 0 < off < total):
                return
            for at, op in anchored.pop((dev_id, step), []):
                op_timers.append(loop.call_later(at, fire_op, op, dev_id))

        def new_gateway() -> Gateway:
            gw = Gateway(cfg, source=server.bind(build_source(cfg)), on_progress=progress)
            gw.fleet.maint.clock = window_clock  # the schedule opens and closes the window
            return gw

        async def in_process_pass(phase: str) -> None:
            gw = new_gateway()
            attempt = gw.attempt

            async def timed(key: str, devs: list[Any]) -> list[Any]:
                rec = [key, loop.time(), None, phase]
                attempts.append(rec)
                try:
                    return await attempt(key, devs)
                finally:
                    rec[2] = loop.time()
            gw.attempt = timed  # type: ignore[method-assign]  # observed, not changed
            task = asyncio.ensure_future(gw.run_once())
            cur["gw"], cur["task"] = gw, task
            try:
                done, _ = await asyncio.wait({task}, timeout=bound + 10.0)
                if not done:  # (iii) is checked from `attempts`; the pass is dropped here
                    cur["timed_out"] = True
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    outcomes.append(f"pass-timeout({phase})")
                    return
                if task.cancelled():  # an operator's restart
                    outcomes.append("restart")
                    return
                res = task.result()
            finally:
                cur["gw"] = cur["task"] = None
                gw.close()
            for dev_id, o in res.outcomes.items():
                last[dev_id] = o.status
                outcomes.append(f"{dev_id}:{o.status.value}")

        async def operate(kind: str, dev_id: str) -> None:
            """One operator action, through the API the control socket calls."""
            t = loop.time()
            if kind == "window":
                set_window(not win["open"])
                op_log.append((t, kind, "*", True, "open" if win["open"] else "closed"))
                server_fired.append(f"op:window-{'open' if win['open'] else 'close'}")
                return
            if kind == "restart":
                task = cur["task"]
                if task is not None and not task.done():
                    task.cancel()
                    server_fired.append("op:restart")
                    op_log.append((t, kind, "*", True, "gateway dropped mid-pass"))
                else:
                    op_log.append((t, kind, "*", False, "no gateway running"))
                return
            gw = cur["gw"]
            temp = gw is None
            if temp:  # between passes: a short-lived gateway object answers (as a daemon would)
                gw = new_gateway()
            reqs = ([{"cmd": "pause", "device": dev_id, "reason": "canceled"},
                     {"cmd": "cancel", "device": dev_id}] if kind == "cancel"
                    else [{"cmd": kind, "device": dev_id}])
            try:
                for req in reqs:
                    try:
                        ans = await gw.fleet.handle(req, "uid=fault-schedules")
                        ok = True
                    except ControlError as exc:
                        ans, ok = str(exc), False
                    op_log.append((loop.time(), str(req["cmd"]), dev_id, ok, str(ans)[:120]))
                    if ok:
                        server_fired.append(f"op:{req['cmd']}")
                    if ok and req["cmd"] == "cancel":
                        cancels.append((loop.time(), dev_id))
                    if ok and req["cmd"] == "resume":
                        resumes.append((loop.time(), dev_id))
            finally:
                if temp:
                    gw.close()

        op_fired = asyncio.Event()

        def fire_op(kind: str, dev_id: str) -> None:
            op_fired.set()
            op_tasks.append(loop.create_task(operate(kind, dev_id)))

        for at, kind, i in sched.ops:
            if "@" not in kind:
                op_timers.append(loop.call_later(at, fire_op, kind, f"d{min(i, len(watches) - 1)}"))
        for w in watches:
            w.start_timers()
        n_pass = 0
        ops_end = t_start + max((at for at, k, _ in sched.ops if "@" not in k), default=0.0)
        while (n_pass < sched.passes or (loop.time() < ops_end and n_pass < 8)) \
                and not cur.get("timed_out"):
            n_pass += 1
            if sched.subprocess:
                rc = await _subprocess_pass(cfg_path, root / "gateway.log", holder)
                rows = _journal(state_dir)
                for dev_id in sim.devices:
                    st = _status_of(rows.get(dev_id))
                    outcomes.append(f"{dev_id}:{st.value if st else 'open'}(rc={rc})")
            else:
                await in_process_pass("faults")
            if n_pass >= sched.passes and loop.time() < ops_end:
                # the operators are still to act: the next pass starts at their next action
                op_fired.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(op_fired.wait(), ops_end - loop.time() + 0.05)
        for h in op_timers:
            h.cancel()
        for t in op_tasks:
            with contextlib.suppress(Exception):
                await t
        for w in watches:
            w.stop_faults()
        server.enabled = False
        set_window(True)  # the window opens for good: what waited for it is done now
        canceled = {d for _, d in cancels}
        if sched.group and canceled:  # a canceled member stays paused: its group is held whole
            canceled |= set(sim.devices)
        # an operator who paused without canceling lets the devices go again for the check
        if sched.ops:
            gw = new_gateway()
            try:
                for dev_id, _why in gw.fleet.ops.paused().items():
                    if dev_id not in canceled:
                        await gw.fleet.handle({"cmd": "resume", "device": dev_id}, "uid=fault-schedules")
                        resumes.append((loop.time(), dev_id))
            finally:
                gw.close()
        # fault-free passes until every device is settled (a canceled device stays paused)
        settled = False
        for _ in range(6):
            await in_process_pass("settle")
            rows = _journal(state_dir)
            if all(last.get(i) in TERMINAL or (
                    last.get(i) == Status.HELD and i in canceled
                    and (rows.get(i) or {}).get("step") != "cancel-pending") for i in sim.devices):
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
        problems += _check_actors(sched, watches, attempts, bound, cancels, resumes, win["log"],
                                  target.hash.hex(), _journal(state_dir), assets)
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
            extra = [f"  {t - t_start:8.3f} operator {k} {d} ack={ok} {ans}"
                     for t, k, d, ok, ans in op_log]
            extra += [f"  {t - t_start:8.3f} window {'open' if o else 'closed'}"
                      for t, o in win["log"]]
            extra += [f"  {a[1] - t_start:8.3f} attempt {a[0]} ({a[3]}) "
                      f"{'-' if a[2] is None else f'{a[2] - a[1]:.2f}s'}" for a in attempts]
            _post_mortem(root, sched, problems, watches, state_dir, extra)
    fired = [f"{w.dev.id}:{x}" for w in watches for x in w.fired] + server_fired
    for w in watches:
        fired += [f"{w.dev.id}:watchdog" for e in w.dev.events
                  if e.kind == "crash" and e.detail.get("reason") == "watchdog"]
        fired += [f"{w.dev.id}:link-loss"] * int(w.dev.counters["lost_requests"]
                                                 + w.dev.counters["lost_responses"])
    return Verdict(sched.seed, not problems, problems, outcomes, fired,
                   time.monotonic() - t0, sched.describe(),
                   {i: st.value for i, st in last.items()})


def _window_closed_long(log_: list[tuple[float, bool]], t: float) -> float | None:
    """How long the window had been closed at ``t`` (None: open)."""
    state = [(at, op) for at, op in log_ if at <= t]
    if not state or state[-1][1]:
        return None
    return t - state[-1][0]


def _check_actors(sched: Schedule, watches: list[DeviceWatch], attempts: list[list[Any]],
                  bound: float, cancels: list[tuple[float, str]], resumes: list[tuple[float, str]],
                  window_log: list[tuple[float, bool]], target: str,
                  rows: dict[str, dict[str, Any]], assets: Assets) -> list[str]:
    """The new actors' invariants (NEW_INVARIANTS), from the devices' side and the journal."""
    problems: list[str] = []
    by_id = {w.dev.id: w for w in watches}
    # (i) nothing pending after a cancel
    for dev_id in sorted({d for _, d in cancels}):
        w = by_id[dev_id]
        states = w.dev.server.state_images()
        act = next((x for x in states if x.active), None)
        other = next((x for x in states if x.slot == 1), None)
        if act is None or not act.confirmed:
            problems.append(f"{dev_id}: after a cancel: runs an unconfirmed image "
                            f"({act.version if act else None}, test-running)")
        if other is not None and (other.pending or other.permanent):
            problems.append(f"{dev_id}: after a cancel: {other.version} is still "
                            f"{'permanent' if other.permanent else 'pending'} in slot 1")
        if (rows.get(dev_id) or {}).get("step") == "cancel-pending":
            problems.append(f"{dev_id}: after a cancel: the journal still waits to revert it "
                            "(cancel-pending) with the window open")
    # (ii) no reset outside a window
    if sched.window is not None:
        for w in watches:
            for q in w.seen:
                reset = q.op == 2 and q.group == 0 and q.cmd == 5
                mark = (q.op == 2 and q.group == 1 and q.cmd == 0 and not q.body.get("confirm")
                        and isinstance(q.body.get("hash"), bytes | bytearray))
                if not (reset or mark):
                    continue
                closed = _window_closed_long(window_log, q.t)
                if closed is not None and closed > WINDOW_GRACE_S:
                    problems.append(f"{w.dev.id}: {'reset' if reset else 'test mark'} (request "
                                    f"#{q.n}) {closed:.2f}s after the window closed")
    # (iii) every attempt ends within its bound
    for unit, start, end, phase in attempts:
        if end is None:
            problems.append(f"{unit}: an attempt ({phase}) never ended: dropped after "
                            f"{bound + 10:.0f}s (bound {bound:.0f}s)")
        elif end - start > bound:
            problems.append(f"{unit}: an attempt ({phase}) took {end - start:.1f}s (bound "
                            f"{bound:.0f}s)")
    # (iv) memory bounded
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rss_mb > MEM_CEILING_MB:
        problems.append(f"peak RSS {rss_mb:.0f} MB above {MEM_CEILING_MB} MB")
    # (v) an operator's cancel survives a restart: the canceled image is never confirmed after
    # the cancel was acknowledged, unless the operator let the device go again
    for t, dev_id in cancels:
        until = min((r for r, d in resumes if d == dev_id and r > t), default=float("inf"))
        for ct, h in by_id[dev_id].confirms:
            if t + CANCEL_GRACE_S < ct < until and h == target:
                problems.append(f"{dev_id}: the target was confirmed {ct - t:.2f}s after the "
                                "operator's cancel was acknowledged")
    foreign = hashlib.sha256((assets.root / "foreign" / "app-3.0.0.bin").read_bytes()).hexdigest()
    for w in watches:
        for e in w.dev.events:
            if e.kind == "upload-start" and (e.detail.get("sha") or "") == foreign:
                problems.append(f"{w.dev.id}: uploaded an image the server linked from outside "
                                "its directory")
    return problems


def _post_mortem(root: Path, sched: Schedule, problems: list[str], watches: list[DeviceWatch],
                 state_dir: Path, actors: list[str] | None = None) -> None:
    out = ["problems:", *[f"  {p}" for p in problems], f"schedule: {sched.describe()}", ""]
    if actors:
        out += ["operators, window, attempts (s after the start):", *actors, ""]
    t0 = min((e.t for w in watches for e in w.dev.events), default=0.0)
    for w in watches:
        out.append(f"device {w.dev.id} (faults fired: {', '.join(w.fired) or '-'}; hostile "
                   f"answers: {w.hostile_answers}):")
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
                   subprocess_share: float = 0.06, actors: frozenset[str] = frozenset(),
                   on_done: Callable[[Verdict], None] | None = None) -> list[Verdict]:
    assets = make_assets(workdir / "assets")
    sem = asyncio.Semaphore(jobs)
    out: list[Verdict] = []

    async def one(seed: int) -> None:
        async with sem:
            sched = make_schedule(seed, subprocess_share=subprocess_share, actors=actors)
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
    ap.add_argument("--actors", default=os.environ.get("SMPGW_FAULT_ACTORS", ""),
                    help="the new actors to draw: all, none or a comma list of "
                         f"{', '.join(ACTORS)} (default: $SMPGW_FAULT_ACTORS, else none)")
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
                  f"--seed {v.seed} --count 1 --actors {args.actors or 'none'} --workdir DIR",
                  flush=True)

    verdicts = asyncio.run(run_many(seeds, workdir, jobs=args.jobs,
                                    subprocess_share=args.subprocess_share,
                                    actors=parse_actors(args.actors), on_done=done))
    bad = [v for v in verdicts if not v.ok]
    wall = time.monotonic() - t0
    print(f"\n{len(verdicts)} schedules, {len(bad)} failed, {sum(len(v.fired) for v in verdicts)} "
          f"faults fired, {wall:.0f}s wall ({wall / max(1, len(verdicts)):.2f}s per schedule)")
    kinds: dict[str, int] = {}
    for v in verdicts:
        for f in v.fired:
            kinds[fault_kind(f)] = kinds.get(fault_kind(f), 0) + 1
    print("fired: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    drawn = sum(1 for v in verdicts if '"actors":[]' not in v.schedule)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"actors drawn in {drawn} schedules; peak RSS {rss:.0f} MB")
    if bad:
        print("failing seeds: " + " ".join(str(v.seed) for v in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
