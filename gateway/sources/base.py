"""The fleet-source interface every update backend implements.

Owns the boundary between a fleet server (or a local directory) and the gateway: *what is the
target for this device*, *fetch that artifact*, and *report progress and outcome*. Outcomes are
expressed in the LwM2M Firmware Update object (/5) vocabulary; each backend maps them onto its
server's own statuses. Sources hand over raw MCUboot image files; checking the signature and
the device policy is the image store's and the engine's job, never a source's.

Reports must survive a restart: each Offer carries ``report_to``, a small JSON-serializable
*report handle* with everything the backend needs to deliver a report later without the
in-memory state of the process that got the offer (hawkBit: controller, action id, feedback
link; MQTT jobs: thing, job id, execution number; RDFM: the device identity its log API
authenticates; latest-release/local: the release they log). The gateway journals it with the
update (``Journal.set_report_handle``) and rebuilds the Offer from it after a restart
(``Offer.from_handle``). ``report()`` must work from ``offer.report_to`` alone, and must raise
``ReportNotDelivered`` when a report did not reach the server (``ReportRefused`` when the
server says it never will): the gateway keeps every final report journaled until one
``report()`` call returned normally.
"""

from __future__ import annotations

import abc
import contextvars
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from gateway.mcuboot import Version

log = logging.getLogger("gateway")


# ``Offer.install`` of an offer the gateway only checks (every pre-flight check, nothing sent
# to the device): the LwM2M source's Downloaded state waits for the server's Update. When the
# checks pass, the source gets ``Report(DOWNLOADED, detail=PREFLIGHT_PASSED)``.
CHECK_ONLY = "check-only"
PREFLIGHT_PASSED = "pre-flight passed: waits for the server's install"


class UpdateState(IntEnum):
    """LwM2M /5/0/3 State."""

    IDLE = 0
    DOWNLOADING = 1
    DOWNLOADED = 2
    UPDATING = 3


class UpdateResult(IntEnum):
    """LwM2M /5/0/5 Update Result."""

    INITIAL = 0
    SUCCESS = 1
    NOT_ENOUGH_FLASH = 2
    OUT_OF_RAM = 3
    CONNECTION_LOST = 4
    INTEGRITY_FAILURE = 5
    UNSUPPORTED_PACKAGE = 6
    INVALID_URI = 7
    UPDATE_FAILED = 8
    UNSUPPORTED_PROTOCOL = 9


@dataclass(frozen=True)
class DeviceView:
    """What a source may know of a device when asked for its target."""

    id: str
    hardware: str
    running_version: Version | None = None
    running_hash: bytes | None = None
    group: str | None = None
    # the gateway.inventory record (slots, bootloader mode, params, last outcome...): each
    # backend reports what it can of it upstream
    inventory: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Offer:
    """A target for one device: the artifact the source wants it to run."""

    device_id: str
    source: str  # backend name, e.g. "local", "rdfm"
    artifact_id: str  # stable id of the artifact (cache key, journal key)
    version: Version | None = None  # when the server says which version it is
    sha256: str | None = None  # hex digest of the downloadable file, when the server gives it
    size: int | None = None
    hardware: str | None = None  # hardware type the artifact targets, when the source knows
    handle: Any = field(default=None, compare=False, repr=False)  # backend-private, in memory
    # JSON-serializable: what report() needs, also in another process after a restart
    report_to: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # how far the server wants it taken: forced | soft | download-only (stage it in the
    # secondary slot, report DOWNLOADED and wait for an install) - see gateway.fleetops
    install: str = field(default="forced", compare=False)

    def report_handle(self) -> dict[str, Any]:
        """The serializable report handle: this offer's identity plus ``report_to``."""
        h: dict[str, Any] = {"device_id": self.device_id, "source": self.source,
                             "artifact_id": self.artifact_id,
                             "version": str(self.version) if self.version is not None else None,
                             "report_to": dict(self.report_to)}
        if self.install != "forced":
            # how far the server wants it taken survives a restart: a download-only update
            # resumed from the journal is staged, never installed (the server did not ask)
            h["install"] = self.install
        return h

    @classmethod
    def from_handle(cls, handle: dict[str, Any]) -> Offer:
        """The Offer ``report()`` needs, rebuilt from ``report_handle()`` (no backend state).

        Raises ValueError when the handle is not one (unreadable journal row)."""
        try:
            version = Version.parse(handle["version"]) if handle.get("version") else None
            report_to = handle.get("report_to") or {}
            if not isinstance(report_to, dict):
                raise TypeError("report_to is not an object")
            return cls(device_id=str(handle["device_id"]), source=str(handle["source"]),
                       artifact_id=str(handle["artifact_id"]), version=version,
                       report_to=dict(report_to), install=str(handle.get("install") or "forced"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a report handle: {exc}") from exc


@dataclass(frozen=True)
class Report:
    """Progress or outcome of one device's update, in LwM2M terms."""

    state: UpdateState
    result: UpdateResult = UpdateResult.INITIAL
    progress: float | None = None  # 0..1 of the upload, when uploading
    detail: str = ""
    report_id: str | None = None  # a final report's journal id: lets a reader drop a duplicate

    @property
    def finished(self) -> bool:
        return self.result != UpdateResult.INITIAL


class FleetSource(abc.ABC):
    """One update backend. Implementations must be safe to call for many devices concurrently."""

    name: str = "source"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections (MQTT session, HTTP pool...)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def check(self, device: DeviceView) -> Offer | None:
        """The target for this device, or None when it is up to date / nothing is assigned."""

    # ``check`` may be used read-only: under ``peek`` it changes nothing on the server (the
    # source checks ``peeking()`` before anything that would: start an execution, send
    # feedback, config data, a status, an inventory). False: ``peek`` refuses (NotReadOnly).
    peekable: bool = False

    async def peek(self, device: DeviceView) -> Offer | None:
        """The target ``check`` would give, for ``run --dry-run``: never changes the server's
        state (no execution started, no status, feedback, config data or inventory sent). A
        source that cannot ask read-only raises NotReadOnly - the dry run then does not ask."""
        if not self.peekable:
            raise NotReadOnly(f"asking {self.name} for the target would change the server's state")
        token = _PEEKING.set(True)
        try:
            return await self.check(device)
        finally:
            _PEEKING.reset(token)

    @abc.abstractmethod
    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        """Download (or locate) the artifact; return the path of a raw MCUboot image file.

        Must check whatever integrity data the server gives (sha256, artifact checksums) and
        refuse a file larger than ``max_size`` before using it; raise FetchError otherwise.
        """

    @abc.abstractmethod
    async def report(self, offer: Offer, report: Report) -> None:
        """Tell the server how the update of ``offer.device_id`` is going / went.

        Works from ``offer.report_to`` alone (the offer may be rebuilt from the journal in
        another process). Returns only once the server has the report; raises
        ``ReportNotDelivered`` otherwise (``ReportRefused`` when it can never be delivered).
        """

    def poll_interval(self) -> float:
        """Seconds until the next check, as the server asks (hawkBit polling.sleep...)."""
        return 10.0

    async def canceled(self, offer: Offer) -> str | None:
        """Polled while ``offer`` is being installed: the reason when the server called it off
        (hawkBit cancelAction, a canceled/removed job, an RDFM target that changed), else None."""
        return None

    async def acknowledge_cancel(self, offer: Offer, done: bool, detail: str) -> None:  # noqa: B027
        """Answer a cancel the way the server expects; ``done``: the update was taken back (or
        its revert is scheduled), False: too late (installed and confirmed)."""


_PEEKING: contextvars.ContextVar[bool] = contextvars.ContextVar("source_peeking", default=False)


def peeking() -> bool:
    """True inside ``FleetSource.peek``: nothing may be sent that changes the server's state."""
    return _PEEKING.get()


class NotReadOnly(Exception):
    """The source cannot answer without changing the server's state (``peek``): not asked."""


class FetchError(Exception):
    """The artifact could not be obtained or failed an integrity check.

    ``permanent``: the download was complete and is the very file the server names (its
    checksum matched), yet the gateway cannot use it (a truncated or malformed artifact): the
    same bytes can never pass, so the gateway refuses and blocks the artifact like a refused
    image instead of downloading it again and again."""

    def __init__(self, message: str, result: UpdateResult = UpdateResult.CONNECTION_LOST,
                 *, permanent: bool = False) -> None:
        super().__init__(message)
        self.result = result
        self.permanent = permanent


class SourceHealth:
    """Whether the fleet server answers: a server outage backs off the *source*, not devices.

    A check that fails because the server is unreachable or answers 5xx (``failed``) is not
    the device's fault: devices are not counted as failing nor parked for it. Instead the
    source waits ``min(max_s, base_s * 2**(n-1))`` +-50 % jitter after its n-th failure in a
    row; while it waits no device asks the server (``may_contact`` is False), and when it is
    due exactly one check probes the server (the others wait for its answer). One log line
    per state change (reachable -> backing off -> reachable), never one per poll.
    """

    def __init__(self, name: str, base_s: float, max_s: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 on_change: Callable[[SourceHealth], None] | None = None) -> None:
        self.name = name
        self.base_s, self.max_s = base_s, max_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_change = on_change
        self.failures = 0  # failed probes in a row (one per backoff round)
        self.next_try = 0.0  # clock(): when the next probe may go out
        self.next_try_at = 0.0  # the same, wall clock (for status)
        self.since = 0.0  # wall clock of the first failure of this outage
        self.last_error = ""
        self.probing = False

    @property
    def down(self) -> bool:
        return self.failures > 0

    def may_contact(self) -> bool:
        """True: ask the server now (while backing off: this caller is the one probe)."""
        if not self.down:
            return True
        if self.probing or self.clock() < self.next_try:
            return False
        self.probing = True
        return True

    def release(self) -> None:
        """A probe that ended without an answer either way (cancelled)."""
        self.probing = False

    def failed(self, error: str) -> None:
        self.probing = False
        self.last_error = error[:300]
        now = self.clock()
        if self.down and now < self.next_try:
            return  # a check that was already in flight: this round is counted once
        self.failures += 1
        delay = min(self.max_s, self.base_s * 2 ** (self.failures - 1)) * self.rng.uniform(0.5, 1.5)
        self.next_try = now + delay
        self.next_try_at = time.time() + delay
        if self.failures == 1:
            self.since = time.time()
            log.warning("source=%s unreachable: %s; backing off (next try in %.1fs); devices are "
                        "not counted as failing", self.name, self.last_error, delay)
        else:
            log.debug("source=%s still unreachable (failure %d, next try in %.1fs): %s",
                      self.name, self.failures, delay, self.last_error)
        if self.on_change is not None:
            self.on_change(self)

    def succeeded(self) -> bool:
        """The server answered; True when that ends an outage."""
        self.probing = False
        if not self.down:
            return False
        log.info("source=%s reachable again after %d failed probe(s) over %.0fs", self.name,
                 self.failures, time.time() - self.since)
        self.failures, self.next_try, self.next_try_at, self.since = 0, 0.0, 0.0, 0.0
        self.last_error = ""
        if self.on_change is not None:
            self.on_change(self)
        return True

    def wait_s(self) -> float:
        """How long a device whose check was held back should wait (it is also woken when the
        server answers again): until the next probe, or one backoff step while one runs."""
        step = min(self.max_s, self.base_s * 2 ** max(0, self.failures - 1))
        if self.probing:
            return step
        return max(0.01, min(step * 1.5, self.next_try - self.clock()))

    def snapshot(self) -> dict[str, Any]:
        """For ``status`` / ``ctl list`` / ``status --json`` (wall-clock times)."""
        return {"source": self.name, "state": "backing-off" if self.down else "ok",
                "failures": self.failures, "since": self.since or None,
                "next_try_at": self.next_try_at or None, "last_error": self.last_error or None}


class NotYetAccepted(Exception):
    """The server knows the device but does not serve it yet (RDFM: its registration waits for
    an administrator). Not an outage and not the device's failure: the device is held (the
    daemon checks again at its next poll; ``run --once`` does not count it as up to date)."""


class ReportNotDelivered(Exception):
    """A report did not reach the server (down, timeout, rejected for now): try again later."""


class ReportRefused(ReportNotDelivered):
    """The server will never take this report (action/job closed or gone, unusable handle).

    A final report refused this way is not retried; the gateway keeps it in the journal with
    the reason (``Journal.reports(state="refused")``) and logs it as an error."""


class ServerCanceled(Exception):
    """The server calls off an update (hawkBit ``cancelAction``), seen by ``check()`` or
    ``fetch()``. A source never decides on its own what that means for the device - it cannot
    know what reached it, least of all after a restart: the gateway journals the cancel as an
    intent, takes back what of the update its journal says reached the device (slot 1 erased, a
    test boot reverted; too late once confirmed) and only then answers the server through
    ``acknowledge_cancel`` (``FleetOps.server_cancel``).

    ``offer``: the canceled update, enough for ``canceled`` / ``acknowledge_cancel`` (also from
    its report handle after a restart); ``match``: the ``report_to`` items that identify it in a
    journaled report handle."""

    def __init__(self, reason: str, offer: Offer, match: dict[str, Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offer = offer
        self.match = match

    def names(self, handle: dict[str, Any] | None) -> bool:
        """``handle`` (a journaled ``Offer.report_handle()``) is the canceled update's."""
        if not isinstance(handle, dict) or handle.get("source") != self.offer.source:
            return False
        rt = handle.get("report_to")
        return isinstance(rt, dict) and all(rt.get(k) == v for k, v in self.match.items())
