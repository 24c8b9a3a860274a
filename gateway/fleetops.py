"""Fleet operations: the one object the scheduler asks before and after each device's update.

Owns the operations layer around the update flow, behind a few calls the daemon makes (it
stays a scheduler; the jobs live here and in the modules named):

* ``devices()`` - the static ``devices:`` plus what discovery found (``gateway.discovery``);
  ``transport(dev)`` - the link to use (a discovered serial device's link follows it to a new
  tty name); ``discover_once()`` for ``run --once``; ``start(add_unit)`` runs discovery and
  reports new units to the scheduler;
* ``admit(key, dev, offer)`` - may this unit install this artifact now, and how far: operator
  pause, staged rollout (``gateway.rollout``), download-only offers and maintenance windows
  (``gateway.maintenance``: outside a window the image is staged in slot 1, nothing is marked
  or reset); ``finished(key, outcomes)`` feeds the rollout;
* ``before_attempt()`` - before a unit takes any session or slot: a rollout's end-of-soak
  check of its canaries (it opens sessions itself, so never from inside one);
* ``run_engine(...)`` - runs the engine while watching for a cancel (fleet server or
  operator) and takes the update back as far as it got (``gateway.cancel``). Every cancel is
  an *intent*, journalled before it is acted on (``Journal.put_intent``) and finished -
  reverted, never confirmed, then acknowledged to the server - at the device's next session
  (``finish_intents``, paused or not, also after a restart) if it was cut short. The last
  gate before any confirm asks the source once more (``probe_cancel``, bounded): a cancel the
  watcher's poll has not seen yet still stops it;
* ``sleep(key, delay)`` - the supervisor's wait, cut short by ``ctl update``, a device that
  came back, a rollout that moved on or a window that opened;
* ``handle(request)`` - the ``smp-gateway ctl`` commands on the control socket
  (``gateway.control``), each journaled (device events + ``fleet.sqlite`` audit) and logged;
* ``note_session`` / ``inventory_for`` - the inventory record the sources report upstream
  (``DeviceView.inventory``, ``gateway.inventory``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway import cancel as cancel_mod
from gateway import devcmd, inventory
from gateway.bootmodes.recovery import in_serial_recovery, last_confirmed_path
from gateway.config import DeviceConfig, GatewayConfig, SerialTransport
from gateway.control import ControlError, ControlServer
from gateway.discovery import Discovery
from gateway.discovery.guard import IdentityGuard
from gateway.discovery.links import FollowingSerialLink
from gateway.engine import Outcome, Slots, Stage, Status, Step, UpdateEngine, set_revert_open
from gateway.images import ImageRefused, ImageStore, VerifiedImageSet
from gateway.journal import STAGED, Entry, Intent, Journal
from gateway.maintenance import MaintenancePolicy
from gateway.metrics import DeviceSeries
from gateway.opstate import OpState, retry_label
from gateway.plan import Stopping
from gateway.rollout import RolloutManager, VerifyDeferred
from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import Transport, TransportError
from gateway.sources.base import (
    CHECK_ONLY,
    PREFLIGHT_PASSED,
    FleetSource,
    Offer,
    Report,
    ServerCanceled,
    SourceHealth,
    UpdateResult,
    UpdateState,
)

log = logging.getLogger("gateway.fleetops")

T = TypeVar("T")
WATCH_STOP_S = 5.0  # how long a finished attempt waits for its cancel watcher to end


async def _wait_event(ev: asyncio.Event, timeout_s: float, *more: asyncio.Event) -> None:
    """Wait until ``ev`` (or one of ``more``) is set or ``timeout_s`` passed. Unlike
    ``asyncio.wait_for`` in Python 3.11 this never turns the caller's cancellation into a
    TimeoutError."""
    waiters = {asyncio.ensure_future(e.wait()) for e in (ev, *more)}
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def _bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """``aw`` within ``timeout_s`` (TimeoutError otherwise); the caller's cancellation is
    always re-raised as such (see ``_wait_event``)."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout_s)
    finally:
        if not fut.done():
            fut.cancel()
    if not done:
        raise TimeoutError(f"no answer within {timeout_s:g}s")
    return fut.result()

ACK_TIMEOUT_S = 30.0  # one try at a cancel's acknowledgement (the server's answer)
# the last gate before a confirm asks the source this long at most: a server that has not
# answered by then does not hold the confirm (the device's own health check passed, (b)); a
# server that answers "canceled" stops it (journalled as a cancel intent first)
CONFIRM_PROBE_S = 10.0


def _open_update(e: Entry) -> str | None:
    """The hash of the device's update the journal holds open (resumable): in progress, or
    failed after this gateway marked it for test (the next attempt would confirm it)."""
    if not e.target_hash:
        return None
    if e.outcome is None or (e.outcome == Status.FAILED.value and e.tested_hash):
        return e.target_hash
    return None


class GatewayLike(Protocol):
    cfg: GatewayConfig
    journal: Journal
    source: FleetSource
    stop: asyncio.Event
    in_session: set[str]
    retry_state: dict[str, dict[str, Any]]
    source_health: SourceHealth
    source_waiting: set[str]

    def units(self) -> list[tuple[str, list[DeviceConfig]]]: ...

    def session(self, dev: DeviceConfig) -> contextlib.AbstractAsyncContextManager[SMPSession]: ...

    @property
    def store(self) -> ImageStore: ...

    def engine(self, dev: DeviceConfig, session: SMPSession) -> UpdateEngine: ...


@dataclass
class Admission:
    go: bool
    until: Stage = Stage.CONFIRMED
    reason: str = ""
    ignore_window: bool = False  # ``ctl update --ignore-window``: resets allowed this attempt

    def held(self, dev: DeviceConfig) -> Outcome:
        return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL, self.reason)


def install_mode(offer: Offer) -> str:
    """forced | soft | download-only | check-only (backends set ``Offer.install`` where the
    server says; check-only: the pre-flight, nothing sent - see ``Stage.CHECKED``)."""
    return str(getattr(offer, "install", None) or "forced")


class FleetOps:
    def __init__(self, gw: GatewayLike) -> None:
        self.gw = gw
        cfg = gw.cfg
        self.cfg = cfg
        self.ops = OpState(cfg.state_dir / "fleet.sqlite")
        self.maint = MaintenancePolicy.from_config(cfg.maintenance_windows)
        self.discovery = None
        if cfg.discovery is not None and cfg.device_templates:
            self.discovery = Discovery(cfg, self.ops, busy=lambda dev_id: dev_id in gw.in_session)
        self.identity = IdentityGuard(cfg, self.ops, self.discovery)  # checked at every session
        self.rollout = RolloutManager(cfg.rollout, self.ops, lambda: max(1, len(gw.units())),
                                      verify=self._verify)
        self._wake: dict[str, asyncio.Event] = {}
        self._now: dict[str, bool] = {}  # device id -> ctl update: ignore the window?
        self._cancel: dict[str, asyncio.Event] = {}
        # a source's news about a device whose update runs (``wake``): its cancel probe now
        self._news: dict[str, asyncio.Event] = {}
        self._cancel_why: dict[str, str] = {}
        self._running: dict[str, str] = {}  # device id -> hash of the image its engine runs
        self._group_cancel: dict[str, asyncio.Event] = {}  # group name -> its run's cancel wake-up
        self._admitted: dict[str, str] = {}  # unit key -> artifact id
        self._facts: dict[str, dict[str, Any]] = {}  # device id -> bootloader mode, params...
        self._control: ControlServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._add_unit: Callable[[str, list[DeviceConfig]], object] | None = None
        self._asked: dict[str, str] = {}  # device id -> the operator whose ctl update runs
        # per-device Prometheus series (state, last outcome, bytes, upload rate)
        self.series = DeviceSeries(lambda: [d.id for d in self.devices()],
                                   lambda: dict(getattr(gw, "steps", {}) or {}))
        m = getattr(gw, "metrics", None)
        if m is not None:
            self.series.register(m)

    def close(self) -> None:
        self.ops.close()

    # -- devices -----------------------------------------------------------------------------
    def devices(self) -> list[DeviceConfig]:
        out = list(self.cfg.devices)
        if self.discovery is not None:  # gone ones too: their supervisor waits for them
            out += sorted((f.config for f in self.discovery.devices.values()), key=lambda d: d.id)
        return out

    def transport(self, dev: DeviceConfig) -> Transport | None:
        """The link for a discovered serial device (follows its tty); None: the usual one."""
        if self.discovery is None or dev.id not in self.discovery.devices:
            return None
        t = dev.transport
        if not isinstance(t, SerialTransport):
            return None

        disc = self.discovery
        return FollowingSerialLink(lambda: disc.port_of(dev.id), t.port, t.baud, t.line_length, t.mtu)

    async def discover_once(self) -> None:
        if self.discovery is not None:
            await self.discovery.start()
            try:
                udp = self.cfg.discovery.udp if self.cfg.discovery else None
                if udp is not None and udp.mdns:  # a browse is a listening window
                    await self.discovery.collect_mdns(udp.probe_timeout_s)
                await self.discovery.scan_once()
            finally:
                await self.discovery.close()
            for f in self.discovery.devices.values():
                self._facts[f.config.id] = f.facts.to_dict()

    # -- life cycle --------------------------------------------------------------------------
    async def start(self, add_unit: Callable[[str, list[DeviceConfig]], object] | None = None) -> None:
        self._add_unit = add_unit
        if self.cfg.control.enabled:
            self._control = ControlServer(self.cfg.control_socket, self.handle)
            try:
                await self._control.start()
            except OSError as exc:
                log.error("control socket unavailable: %s", exc)
                self._control = None
        if self.discovery is not None:
            self._tasks.append(asyncio.create_task(self.discovery.run(self._on_discovery, self.gw.stop),
                                                   name="discovery"))
        self._tasks.append(asyncio.create_task(self._relay_rollout(), name="rollout-wake"))

    async def close_async(self) -> None:
        self.rollout.close()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._control is not None:
            await self._control.close()
            self._control = None

    def _on_discovery(self, ch: Any) -> None:
        assert self.discovery is not None
        for f in self.discovery.devices.values():
            self._facts[f.config.id] = f.facts.to_dict()
        known = {k for k, _ in self.gw.units()}
        gone_hook = getattr(self.gw.source, "device_gone", None)  # LwM2M: deregister its endpoint
        if gone_hook is not None:
            for dev_id in ch.gone:
                gone_hook(dev_id)
        for dev in [*ch.added, *ch.moved, *ch.released]:
            self.wake(dev.id)
        if self._add_unit is None:
            return
        for key, devs in self.gw.units():
            if key not in known or any(d.id in {a.id for a in ch.added} for d in devs):
                self._add_unit(key, devs)

    async def _relay_rollout(self) -> None:
        while True:
            await self.rollout.changed.wait()
            self.rollout.changed.clear()
            for ev in self._wake.values():
                ev.set()

    # -- scheduling --------------------------------------------------------------------------
    def _event(self, key: str) -> asyncio.Event:
        return self._wake.setdefault(key, asyncio.Event())

    def wake(self, device_or_key: str) -> None:
        """The unit's next check now; for a device whose update runs, also its cancel probe
        (a server event-driven source's cancel is acted on at once, not a poll period later)."""
        news = self._news.get(device_or_key)
        if news is not None:
            news.set()
        member = next((d for d in self.devices() if d.id == device_or_key and d.group), None)
        gev = self._group_cancel.get(str(member.group)) if member is not None else None
        if gev is not None:  # a running group's member: its group's cancel probe now
            gev.set()
        for key, devs in self.gw.units():
            if key == device_or_key or any(d.id == device_or_key for d in devs):
                self._event(key).set()

    async def sleep(self, key: str, delay: float) -> None:
        """The supervisor's wait: ``delay``, the stop, or a wake-up, whichever comes first."""
        ev = self._event(key)
        if ev.is_set():
            ev.clear()
            return
        stop = self.gw.stop
        waits = [asyncio.create_task(ev.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            ev.clear()

    def next_wake_s(self, devs: list[DeviceConfig], default: float) -> float:
        """A unit held for a window wakes when it opens (if that is sooner than ``default``)."""
        waits = [self.maint.seconds_until_allowed(d) for d in devs]
        return min(default, max(waits)) if waits and max(waits) > 0 else default

    def paused(self, dev: DeviceConfig) -> str | None:
        why = self.ops.is_paused(dev.id)
        return f"paused by the operator ({why})" if why is not None else None

    async def admit(self, key: str, dev: DeviceConfig, offer: Offer) -> Admission:
        """Before anything is sent for ``offer``: go, go up to a stage, or hold (with why).

        A pause stops new work, never the taking back of a failed test boot: the journal's (c)
        open revert of a failed image set (``set_revert_open``) goes on while paused - its
        reset still only through the maintenance-window gate (``reset_gate``)."""
        why = self.paused(dev)
        if why is not None and set_revert_open(self.gw.journal.get(dev.id)):
            log.info("device=%s paused, but the failed image set's open revert is finished",
                     dev.id)
            return Admission(True)
        if why is not None:
            return Admission(False, reason=why)
        now = self._now.pop(dev.id, None)
        if self.rollout.enabled and now is None:
            d = await self.rollout.admit(key, offer.artifact_id)
            if not d.go:
                log.info("device=%s held by the rollout: %s", dev.id, d.reason)
                return Admission(False, reason=f"rollout: {d.reason}")
        self._admitted[key] = offer.artifact_id
        if install_mode(offer) == CHECK_ONLY:  # LwM2M Downloaded: the server's Update installs
            return Admission(True, Stage.CHECKED, PREFLIGHT_PASSED)
        if install_mode(offer) == "download-only":
            return Admission(True, Stage.UPLOADED, "download-only: staged in the secondary slot; "
                                                   "waits for the server's install")
        if not now and not self.maint.reset_allowed(dev):
            return Admission(True, Stage.UPLOADED, f"staged in the secondary slot; "
                                                   f"{self.maint.describe(dev)}")
        return Admission(True, ignore_window=bool(now))

    def reset_gate(self, dev: DeviceConfig) -> Callable[[], str | None]:
        """The one check every mark-and-reset and reset of the engine and the group runner
        goes through (``UpdateEngine.reset_gate``), at the moment it would be sent: None = a
        reset is allowed now, else why not (outside the maintenance windows, and when the
        next one opens). The admission only decided at the start of the attempt; a window can
        close during an upload or a wait."""
        def gate() -> str | None:
            return None if self.maint.reset_allowed(dev) else self.maint.describe(dev)
        return gate

    def gate_group(self, key: str, devs: list[DeviceConfig]) -> list[Outcome] | None:
        """A group starts only when no member is paused and every member may be reset now
        (its phases mark and reset all members together); else every member is held,
        untouched. The staged rollout gates it once its members are planned (``admit_group``)."""
        if self.group_cancels(devs):
            for d in devs:  # a ``ctl update --ignore-window`` meanwhile is answered by the
                self._now.pop(d.id, None)  # cancel: never left for a later server offer
            return None  # a journalled cancel is finished first, paused or not (resets: gated)
        why = next((w for w in (self.paused(d) for d in devs) if w), None)
        if why is None and not all(self.maint.reset_allowed(d) for d in devs):
            d = next(d for d in devs if not self.maint.reset_allowed(d))
            why = f"group waits for a maintenance window ({d.id}: {self.maint.describe(d)})"
        if why is None:
            return None
        return [Outcome(d.id, Status.HELD, UpdateResult.INITIAL, why, group=d.group) for d in devs]

    def install_gate(self, offer: Offer) -> Callable[[], str | None] | None:
        """The source's own hold on marks and resets for ``offer`` (hawkBit: the action's
        maintenance window), or None. Server metadata only ever withholds a reset, added to
        the gateway's windows (c); it never allows one. Unreadable: it holds (fail safe)."""
        gate = getattr(self.gw.source, "install_gate", None)
        if gate is None or offer.source != self.gw.source.name:
            return None
        try:
            made: Callable[[], str | None] = gate(offer)
        except Exception as exc:
            why = f"{self.gw.source.name}'s install window unreadable: {exc}"
            return lambda: why
        return made

    @staticmethod
    def install_stage(members: list[tuple[DeviceConfig, Offer]]) -> tuple[Stage, str]:
        """How far a group goes by its members' offers (``install_mode``), as ``admit`` for one
        device: a check-only or download-only offer of ANY member stops the whole group
        before anything is marked (all or nothing: no member installs alone)."""
        modes = {install_mode(o) for _, o in members}
        if CHECK_ONLY in modes:
            return Stage.CHECKED, PREFLIGHT_PASSED
        if "download-only" in modes:
            return Stage.UPLOADED, ("download-only: staged in the secondary slot; waits for the "
                                    "server's install")
        return Stage.CONFIRMED, ""

    async def admit_group(self, key: str, members: list[tuple[DeviceConfig, Offer]],
                          resumed: bool = False) -> str | None:
        """The staged rollout's word on a planned group (one unit): None = go, else why it
        waits (nothing has been sent to any member). Its wave is the members' artifact (several
        different artifacts: their ids joined by '+'). A group resumed past its upload phase
        is never held back, only accounted (its outcome feeds the rollout)."""
        art = "+".join(sorted({o.artifact_id for _, o in members}))
        if not resumed:
            why = next((w for w in (self.paused(d) for d, _ in members) if w), None)
            if why is not None:
                return why
            now = [self._now.pop(d.id, None) for d, _ in members]  # ctl update: not gated
            if self.rollout.enabled and all(n is None for n in now):
                d = await self.rollout.admit(key, art)
                if not d.go:
                    log.info("unit=%s held by the rollout: %s", key, d.reason)
                    return f"rollout: {d.reason}"
        self._admitted[key] = art
        return None

    def after_hold(self, dev: DeviceConfig, offer: Offer) -> None:
        """The engine stopped at the stage ``admit`` allowed. A download-only offer is done
        with: close the journal row (``staged``), so the next attempt follows the server (its
        install action), not the journal; a window hold stays open and resumes at the window."""
        if install_mode(offer) != "download-only":
            return
        e = self.gw.journal.get(dev.id)
        if e.outcome is None:
            self.gw.journal.put(e.with_(step=STAGED, outcome=STAGED),
                                "download-only: staged in the secondary slot; waits for the install")

    def finished(self, key: str, outs: list[Outcome]) -> None:
        art = self._admitted.get(key)
        if art is None:
            return
        final = [o for o in outs if o.status not in (Status.HELD,)]
        if not final:
            return
        self._admitted.pop(key, None)
        ok = all(o.ok for o in final)
        bad = next((o for o in final if not o.ok), None)
        self.rollout.finished(key, art, ok, f"{bad.status.value}: {bad.detail}" if bad else "")

    async def before_attempt(self) -> None:
        """The scheduler calls this before a unit takes any session or concurrency slot: the
        end of a rollout's soak is checked here (its check opens sessions with the canaries;
        done from inside a session it would wait for slots held by units waiting for it)."""
        await self.rollout.settle()

    async def _verify(self, unit: str, artifact: str) -> str | None:
        """End of a soak: each canary device, read now, runs the wave's image, confirmed - what
        the device reports (b), never the server. Runs holding no session (``settle``)."""
        devs = dict(self.gw.units()).get(unit, [])
        for dev in devs:
            e = self.gw.journal.get(dev.id)
            try:
                async with self.gw.session(dev) as s:
                    slots = Slots.parse(await s.image_state(), dev.image)
            except Stopping as exc:
                raise VerifyDeferred("the gateway is stopping") from exc
            if slots.active_hash is None or slots.active_hash.hex() != e.target_hash:
                now = slots.running or "?"
                return f"{dev.id} runs {now}, not {e.target_version}"
            if not (slots.active and slots.active.confirmed):
                return f"{dev.id}: {e.target_version} is not confirmed"
        return None

    # -- cancellation: an intent, journalled before it is acted on --------------------------
    def request_cancel(self, device_id: str, reason: str) -> bool:
        """The operator's cancel. Journalled as an intent (``Journal.put_intent``) *before* it
        is acted on: at once when an update runs now, else at the device's next session (also
        when the device is paused, also after a restart). False: no update to take back (none
        runs, and the journal has none open)."""
        ev = self._cancel.get(device_id)
        member = next((d for d in self.devices() if d.id == device_id and d.group), None)
        if member is not None:  # the whole group goes back (``gateway.groups``: all or nothing)
            th = self._running.get(device_id) or self._group_target(member)
            if th is None:
                return False
            self.gw.journal.put_intent(device_id, "cancel", th, "operator", reason)
            gev = self._group_cancel.get(str(member.group))
            if gev is not None:
                gev.set()
            else:
                self.wake(device_id)
            return True
        th = _open_update(self.gw.journal.get(device_id)) or self._running.get(device_id)
        if th is None:
            return False
        self.gw.journal.put_intent(device_id, "cancel", th, "operator", reason)
        self._cancel_why[device_id] = reason
        if ev is not None:
            ev.set()
        else:
            self.wake(device_id)
        return True

    def _group_target(self, dev: DeviceConfig) -> str | None:
        """The member's target in its group's journalled update, while that is not over."""
        rec = self.gw.journal.group(str(dev.group))
        if rec is None or rec.phase in ("done", "failed", "staged"):
            return None
        return rec.members.get(dev.id)

    # -- groups: a cancel of any member takes the whole group back (gateway.groups) ----------
    def group_cancels(self, devs: list[DeviceConfig]) -> list[Intent]:
        """The open cancel intents of a group's members, oldest first."""
        return [i for d in devs for i in self.gw.journal.open_intents(d.id) if i.kind == "cancel"]

    async def watch_group_cancel(self, name: str,
                                 members: list[tuple[DeviceConfig, Offer, str]],
                                 stop: asyncio.Event | None = None) -> Intent:
        """While a group runs: until a cancel of any member arrives - the operator's (journalled
        by ``request_cancel``) or the fleet server's for any member's offer (its ``canceled``
        probe, as ``_watch_cancel``), journalled here before anything is done about it. Each
        probe is bounded in time; a server hiccup is not a cancel. ``stop`` set: the run is
        over, the watcher ends at its next turn (``_bounded``/``_wait_event``, never
        ``asyncio.wait_for``, which can swallow the caller's cancellation in Python 3.11)."""
        src = self.gw.source
        probe: Callable[[Offer], Awaitable[str | None]] | None = getattr(src, "canceled", None)
        period = min(30.0, max(0.5, src.poll_interval()))
        ev = self._group_cancel.setdefault(name, asyncio.Event())
        for dev, _, th in members:
            self._running[dev.id] = th
        try:
            while True:
                if stop is not None and stop.is_set():
                    raise asyncio.CancelledError
                mine = self.group_cancels([d for d, _, _ in members])
                if mine:
                    return mine[0]
                for dev, offer, th in members:
                    if probe is None or offer.source != src.name:
                        continue
                    try:
                        why = await _bounded(probe(offer), max(5.0, period))
                    except Exception as exc:  # a server hiccup is not a cancel
                        log.debug("device=%s cancel check failed: %s", dev.id, exc)
                        why = None
                    if why:  # journalled even as the run ends: ``GroupRunner.run`` answers it
                        return self.gw.journal.put_intent(dev.id, "cancel", th, "server",
                                                          str(why), offer.report_handle())
                    if stop is not None and stop.is_set():
                        raise asyncio.CancelledError
                await _wait_event(ev, period)
                ev.clear()
        finally:
            for dev, _, _ in members:
                self._running.pop(dev.id, None)
            self._group_cancel.pop(name, None)

    async def finish_group_cancel(self, dev: DeviceConfig, intent: Intent,
                                  verdict: str | None) -> None:
        """The group's take-back for this member's cancel is over (``verdict`` "taken back:
        ..." or "too late: ..."; None: it was already, only the acknowledgement is left): the
        intent moves on, and a server's cancel is acknowledged - only now."""
        if intent.state == "pending" and verdict is not None:
            state = "ack" if intent.actor == "server" else "done"
            self.gw.journal.intent_progress(intent.id, state, verdict)
            self.ops.audit(intent.actor if intent.actor == "operator" else "fleet", "cancel",
                           dev.id, verdict)
            intent = replace(intent, state=state, detail=verdict)
        if intent.state == "ack":
            await self._acknowledge(dev, intent, intent.detail.startswith("taken back"), None)

    async def _watch_cancel(self, dev: DeviceConfig, offer: Offer, ev: asyncio.Event,
                            started: asyncio.Event, target: str,
                            stop: asyncio.Event) -> Intent:
        """Until a cancel arrives: the operator's (already journalled by ``request_cancel``) or
        the fleet server's, journalled here before anything is done about it. The server's
        word only ever leads to taking an update back, never to installing anything. The first
        probe runs before the engine starts (``started`` is set after it): a job closed while
        it downloaded sends nothing. Each round also gives the source the upload's journaled
        progress (bounded rate)."""
        src = self.gw.source
        probe: Callable[[Offer], Awaitable[str | None]] | None = getattr(src, "canceled", None)
        period = min(30.0, max(0.5, src.poll_interval()))
        sent = -1
        news = self._news.setdefault(dev.id, asyncio.Event())
        while True:
            if started.is_set():
                await _wait_event(ev, period, news)
                news.clear()
            if stop.is_set():  # the engine finished: a cancel from here on is not this attempt's
                raise asyncio.CancelledError
            if ev.is_set():
                mine = self._cancel_intent(dev.id)
                if mine is not None:
                    return mine
                return self.gw.journal.put_intent(
                    dev.id, "cancel", self._cancel_hash(dev.id, target), "operator",
                    self._cancel_why.get(dev.id, "canceled by the operator"))
            why = None
            if probe is not None:
                try:
                    why = await _bounded(probe(offer), max(5.0, period))
                except Exception as exc:  # a server hiccup is not a cancel
                    log.debug("device=%s cancel check failed: %s", dev.id, exc)
                if why:
                    return self.gw.journal.put_intent(
                        dev.id, "cancel", self._cancel_hash(dev.id, target), "server", str(why),
                        offer.report_handle())
            started.set()
            e = self.gw.journal.get(dev.id)
            if e.step == "upload" and e.upload_total and e.upload_offset != sent:
                sent = e.upload_offset
                with contextlib.suppress(Exception):  # progress is best effort
                    await src.report(offer, Report(UpdateState.UPDATING,
                                                   progress=e.upload_offset / e.upload_total))

    def confirm_gate(self, dev: DeviceConfig, offer: Offer,
                     target: str) -> Callable[[], Awaitable[str | None]]:
        """The engine's last gate before it confirms ``target`` (``UpdateEngine.confirm_gate``):
        ``probe_cancel`` - None: confirm; else the journalled cancel's reason (not confirmed)."""
        async def gate() -> str | None:
            intent = await self.probe_cancel(dev, offer, target)
            return intent.reason if intent is not None else None
        return gate

    async def probe_cancel(self, dev: DeviceConfig, offer: Offer, target: str) -> Intent | None:
        """Right before a confirm (a single device's or a group member's): an open cancel
        intent of the device, else the source's word now - ``canceled(offer)``, the contract
        every source that can cancel implements (AWS jobs, hawkBit, LwM2M, IoT Hub, RDFM) -
        asked at most ``CONFIRM_PROBE_S``. Its "canceled" is journalled as a server cancel
        intent BEFORE anything is done about it, and the watcher is woken to take it back; no
        answer in time (or an error) is not a cancel: the confirm rests on the device's own
        health check (b). The server's word only ever stops a confirm, never causes one."""
        mine = self._cancel_intent(dev.id)
        if mine is not None:
            return mine
        src = self.gw.source
        probe: Callable[[Offer], Awaitable[str | None]] | None = getattr(src, "canceled", None)
        if probe is None or offer.source != src.name:
            return None
        try:
            why = await _bounded(probe(offer), CONFIRM_PROBE_S)
        except Exception as exc:
            log.warning("device=%s %s did not answer before the confirm (%s: %s): confirmed on "
                        "the device's health check", dev.id, src.name, type(exc).__name__, exc)
            return None
        if not why:
            return self._cancel_intent(dev.id)  # an operator's, journalled meanwhile
        intent = self.gw.journal.put_intent(dev.id, "cancel", self._cancel_hash(dev.id, target),
                                            "server", str(why), offer.report_handle())
        log.warning("device=%s %s canceled the update right before its confirm: %s", dev.id,
                    src.name, why)
        ev = self._cancel.get(dev.id)
        if ev is not None:  # the running attempt's watcher takes it back now
            ev.set()
        gev = self._group_cancel.get(str(dev.group)) if dev.group else None
        if gev is not None:  # a group member's: the whole group goes back
            gev.set()
        return intent

    def _cancel_intent(self, device_id: str) -> Intent | None:
        return next((i for i in self.gw.journal.open_intents(device_id) if i.kind == "cancel"),
                    None)

    def _cancel_hash(self, device_id: str, fallback: str) -> str:
        """The hash the cancel takes back: the journal's open update (the build actually sent,
        e.g. a direct-XIP slot build), else the image the engine was started with."""
        return _open_update(self.gw.journal.get(device_id)) or fallback

    async def run_engine(self, dev: DeviceConfig, offer: Offer, image_hash: bytes, session: SMPSession,
                         run: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """``run()`` (the engine), unless a cancel arrives first: then - the cancel journalled
        first - undo as far as it got (``finish_cancel``)."""
        ev = self._cancel.setdefault(dev.id, asyncio.Event())
        ev.clear()
        self._running[dev.id] = image_hash.hex()
        started, stop = asyncio.Event(), asyncio.Event()
        watch = asyncio.ensure_future(self._watch_cancel(dev, offer, ev, started,
                                                         image_hash.hex(), stop))

        async def after_first_probe() -> Outcome:
            await started.wait()
            return await run()

        task = asyncio.ensure_future(after_first_probe())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            watch.cancel()
            raise
        finally:
            self._cancel.pop(dev.id, None)
            self._news.pop(dev.id, None)
            self._running.pop(dev.id, None)
        if task.done():
            # never wait on the watcher unbounded: Python 3.11's wait_for can turn a
            # cancellation into a timeout the watcher then swallows (found by fault schedule
            # seed 9: the attempt hung 50 s after its confirm); ``stop`` ends it at its next turn
            stop.set()
            watch.cancel()
            await asyncio.wait({watch}, timeout=WATCH_STOP_S)
            out = task.result()
            intent = self._cancel_intent(dev.id) if out.status == Status.HELD else None
            if intent is not None and intent.state == "pending":
                # the engine stopped at its confirm for a cancel journalled meanwhile (e.g. by
                # ``confirm_gate``): taken back now, not left for the next session
                log.warning("device=%s update canceled before its confirm (%s, intent %d): %s",
                            dev.id, intent.actor, intent.id, intent.reason)
                return await self.finish_cancel(dev, session, intent, offer)
            return out
        intent = watch.result()
        log.warning("device=%s update canceled (%s, journalled as intent %d): %s", dev.id,
                    intent.actor, intent.id, intent.reason)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return await self.finish_cancel(dev, session, intent, offer)

    async def finish_cancel(self, dev: DeviceConfig, session: SMPSession, intent: Intent,
                            offer: Offer | None = None) -> Outcome:
        """Act on a journalled cancel intent: take the update back (``cancel.undo``: a revert,
        never a confirm; a reset only where the maintenance window allows it), then - only once
        it is taken back - acknowledge it to the server (a server's cancel). The intent stays
        open (and this is called again at the next session, also after a restart) until both
        are done; a take-back cut short (the device silent while it swaps) is simply redone."""
        journal = self.gw.journal
        too_late = False
        if intent.state == "pending":
            if not intent.target_hash:
                journal.intent_progress(intent.id, "done", "nothing identifiable to take back")
                return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL, "canceled")
            try:
                members = await self._set_members(dev, intent.target_hash)
                res = await cancel_mod.undo(session, dev, journal, bytes.fromhex(intent.target_hash),
                                            intent.reason, reset_allowed=self.maint.reset_allowed(dev),
                                            members=members)
            except (SMPError, SMPTimeout, TransportError, ImageRefused, OSError) as exc:
                detail = (f"take-back interrupted ({type(exc).__name__}: {exc}); the cancel stays "
                          "journalled and is finished first at the next session")
                journal.intent_progress(intent.id, "pending", detail)
                log.warning("device=%s cancel: %s", dev.id, detail)
                return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL, f"canceled: {detail}")
            if res.stuck and len(journal.events(
                    dev.id, steps=("intent-cancel-pending",), limit=cancel_mod.TAKE_BACK_RESETS,
                    detail_prefix=f"intent={intent.id}: {cancel_mod.STUCK}",
            )) + 1 >= cancel_mod.TAKE_BACK_RESETS:  # bounded: closed, not reset for ever
                res = replace(res, detail=cancel_mod.not_taken_back(
                    journal, dev.id, bytes.fromhex(intent.target_hash), res.detail), gave_up=True)
            elif res.deferred or not (res.done or res.phase == "confirmed"):
                # labelled by the gateway (the detail starts with the reason: outside input)
                journal.intent_progress(intent.id, "pending", (
                    f"{cancel_mod.STUCK}{res.detail} (the take-back goes on at the next "
                    "session)" if res.stuck else f"{cancel_mod.NOT_YET}{res.detail}"))
                # not taken back yet: nothing is decided, so nothing is reported - the intent
                # stays open and is finished first at the next session (fault schedule seed 298:
                # a FAILED outcome here went out as a final report with result 0, which the
                # server takes for no final report at all)
                return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL, f"canceled: {res.detail}",
                               old_version=res.running)
            # taken back, or too late (confirmed before the cancel): the device's part is over
            too_late = res.phase == "confirmed"
            verdict = ("taken back: " if res.done else "" if res.gave_up else "too late: ") + res.detail
            journal.intent_progress(intent.id, "ack" if intent.actor == "server" else "done", verdict)
            self.ops.audit(intent.actor if intent.actor == "operator" else "fleet", "cancel", dev.id,
                           res.detail)
            intent = replace(intent, state="ack" if intent.actor == "server" else "done",
                             detail=verdict)
            running = res.running
        else:
            running = None
        done = intent.detail.startswith("taken back")
        if intent.state == "ack":
            await self._acknowledge(dev, intent, done, offer)
        detail = intent.detail.split(": ", 1)[-1]
        e = journal.get(dev.id)
        if too_late and offer is not None and _open_update(e) == intent.target_hash:
            # (b) the device itself reports the image running, confirmed: the update happened,
            # only the cancel came too late - not a failure (no failure report to the server,
            # none counted by the rollout); the row is closed as the engine would have
            journal.put(e.with_(step=Step.DONE.value, outcome=Status.UPDATED.value,
                                last_error=None, running_version=running),
                        f"installed and confirmed before the cancel: {detail}")
            return Outcome(dev.id, Status.UPDATED, UpdateResult.SUCCESS,
                           f"{e.old_version} -> {running}, confirmed; the cancel came too late "
                           f"({detail})", old_version=e.old_version, new_version=running)
        # taken back, or an acknowledgement sent again for a decision reported before: HELD
        return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL, f"canceled: {detail}",
                       old_version=running)

    async def server_cancel(self, dev: DeviceConfig, session: SMPSession,
                            cancel: ServerCanceled) -> Outcome:
        """The source saw the server call off an update outside a running engine (``check`` /
        ``fetch``: e.g. an update staged in slot 1, or the device not yet touched). What reached
        the device is what the gateway's own journal says (c) - the same with or without a
        restart: when its row follows the canceled update (its report handle and artifact),
        that image is taken back (``finish_cancel``: an unmarked slot-1 image erased; too late
        once confirmed); else nothing of it reached the device. Journalled first, as always."""
        journal = self.gw.journal
        e, handle = journal.get(dev.id), journal.report_handle(dev.id)
        ours = (cancel.names(handle) and handle is not None and e.target_hash is not None
                and handle.get("artifact_id") == e.artifact_id)
        offer = Offer.from_handle(handle) if ours and handle is not None else cancel.offer
        intent = journal.put_intent(dev.id, "cancel", e.target_hash if ours else None, "server",
                                    cancel.reason, offer.report_handle())
        if not ours and intent.state == "pending":
            verdict = "taken back: nothing of it reached the device"
            journal.intent_progress(intent.id, "ack", verdict)
            intent = replace(intent, state="ack", detail=verdict)
        return await self.finish_cancel(dev, session, intent, offer)

    async def _set_members(self, dev: DeviceConfig, target_hash: str) -> frozenset[bytes]:
        """The hashes of ``dev.image``'s members when the canceled update is an image set (its
        id is no image's hash): the set as the store verified it - (a) what the signatures
        cover - from the journal row's stored file. ImageRefused/OSError if that file cannot be
        read: the cancel then stays pending rather than undo a set it cannot recognise."""
        e = self.gw.journal.get(dev.id)
        if e.target_hash != target_hash or not e.image_path or not e.image_path.endswith(".zip"):
            return frozenset()
        iset = await self.gw.store.add_file_async(Path(e.image_path), hardware=None,
                                                  allow_unsigned=dev.allow_unsigned)
        if not isinstance(iset, VerifiedImageSet) or iset.hash.hex() != target_hash:
            return frozenset()
        return frozenset(m.hash for m in iset.members if m.image == dev.image)

    async def _acknowledge(self, dev: DeviceConfig, intent: Intent, done: bool,
                           offer: Offer | None) -> bool:
        """The cancel's answer to the server, sent only once the take-back is over; kept in the
        journal (intent state ``ack``) and retried at the next session until it went out."""
        src = self.gw.source
        ack: Callable[[Offer, bool, str], Awaitable[None]] | None = getattr(
            src, "acknowledge_cancel", None)
        detail = intent.detail.split(": ", 1)[-1]
        try:
            if offer is None:
                offer = Offer.from_handle(intent.handle or {})
        except ValueError as exc:
            self.gw.journal.intent_progress(intent.id, "done", f"not acknowledged: {exc}")
            return True
        if ack is None or offer.source != src.name:
            self.gw.journal.intent_progress(intent.id, "done", f"no acknowledgement to send "
                                            f"({src.name}): {detail}")
            return True
        try:
            probe = getattr(src, "canceled", None)
            if probe is not None:  # a restarted gateway learns the server's cancel again
                await asyncio.wait_for(probe(offer), ACK_TIMEOUT_S)
            await asyncio.wait_for(ack(offer, done, detail), ACK_TIMEOUT_S)
        except Exception as exc:  # the server is unreachable: the intent stays at ``ack``
            self.gw.journal.intent_progress(intent.id, "ack", f"{intent.detail} (acknowledgement "
                                            f"not delivered: {type(exc).__name__}: {exc})")
            log.warning("device=%s cancel acknowledgement failed: %s", dev.id, exc)
            return False
        self.gw.journal.intent_progress(intent.id, "done", f"acknowledged to {src.name}: {detail}")
        return True

    async def finish_intents(self, dev: DeviceConfig, session: SMPSession) -> Outcome | None:
        """Every intent journalled for ``dev`` and not finished, finished first - before the
        session reads the source or resumes anything, and also when the device is paused (a
        pause stops new work, not the taking back of a canceled update; resets still wait for
        a maintenance window). An Outcome while one stays open: the session does nothing else,
        so a canceled image is never resumed or confirmed. None when none is left.

        A ``cancel-pending`` journal row of an older gateway (no intents table then) is adopted
        as an operator cancel first."""
        e = self.gw.journal.get(dev.id)
        if e.step == cancel_mod.CANCEL_PENDING and e.target_hash and self._cancel_intent(dev.id) is None:
            self.gw.journal.put_intent(dev.id, "cancel", e.target_hash, "operator",
                                       e.last_error or "canceled")
        for intent in self.gw.journal.open_intents(dev.id):
            if intent.kind != "cancel":
                continue
            out = await self.finish_cancel(dev, session, intent)  # undo defers a reset outside a window
            if any(i.id == intent.id for i in self.gw.journal.open_intents(dev.id)):
                # a ``ctl update --ignore-window`` given meanwhile was for the operator's own
                # update check, answered by this open cancel: never left behind for the
                # server's next offer to install outside the window
                self._now.pop(dev.id, None)
                if out.status == Status.HELD and not self.maint.reset_allowed(dev):
                    out.detail = (f"canceled update waits for a maintenance window to be "
                                  f"reverted ({self.maint.describe(dev)})")
                return out
        return None

    # -- recovery: last resort ----------------------------------------------------------------
    async def last_resort(self, dev: DeviceConfig, session: SMPSession) -> Outcome | None:
        """``recovery: {enabled: true, last_resort: true}``: a device whose application no
        longer answers SMP but whose MCUboot serial recovery does (its image list flags no slot
        active - (b), what the device itself reports) is re-flashed with the last image the
        device itself reported running confirmed (b) (``Journal.confirmed``, ``bootmodes.recovery.
        last_confirmed_path``; the stored file's hash and signature are verified again - (a)),
        through ``UpdateEngine.recover``. Only when the config enables it (c), the device is not
        paused, and no update of the journal is open (an update in progress is its own flow's:
        single-slot modes resume their recovery upload). None: nothing to do here."""
        rec = dev.recovery
        if rec is None or not rec.enabled or not rec.last_resort:
            return None
        if _open_update(self.gw.journal.get(dev.id)) is not None:
            return None
        try:
            states = await session.image_state(timeout_s=dev.timeouts.request_s, retries=1)
        except (SMPError, SMPTimeout, TransportError):
            return None  # the normal flow reports what does (not) answer
        if not in_serial_recovery(states):
            return None
        why = self.paused(dev)
        if why is not None:
            return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL,
                           f"in MCUboot serial recovery; the last-resort re-flash waits: {why}")
        # only what the device itself reported running confirmed (b), never the row's target,
        # old or running hash (a canceled or refused image must not be flashed for good)
        found = last_confirmed_path(self.gw.journal.confirmed(dev.id), self.gw.store.root)
        if found is None:
            return Outcome(dev.id, Status.FAILED, UpdateResult.UPDATE_FAILED,
                           "the device answers only from MCUboot serial recovery, and no image "
                           "this gateway confirmed there is stored: not re-flashed")
        try:
            image = self.gw.store.add_file(found[0], hardware=dev.hardware,
                                           allow_unsigned=dev.allow_unsigned)
        except ImageRefused as exc:
            return Outcome(dev.id, Status.FAILED, exc.reason.lwm2m,
                           f"last-resort image {found[0].name} refused: {exc}")
        log.warning("device=%s application does not answer, MCUboot serial recovery does: "
                    "re-flashing %s (recovery.last_resort)", dev.id, image.version)
        out = await self.gw.engine(dev, session).recover(image)
        after = self.gw.journal.get(dev.id)
        if after.unreported is not None:  # not a fleet update: no final report to a server
            self.gw.journal.put(after.with_(unreported=None), f"last resort: {out.detail}")
        self.ops.audit("gateway", "recover", dev.id, out.detail)
        return out

    # -- inventory ---------------------------------------------------------------------------
    async def note_session(self, dev: DeviceConfig, session: SMPSession) -> None:
        """Remember what a session knows of the device for its inventory (bootloader info is
        read once per device and process; MCUmgr parameters come with every session)."""
        facts = self._facts.setdefault(dev.id, {})
        p = session.params
        if p is not None:
            facts["params"] = {"buf_size": p.buf_size, "buf_count": p.buf_count,
                               "reported": p.reported}
        if "bootloader" not in facts:
            bl = await session.bootloader_info(timeout_s=min(2.0, dev.timeouts.request_s))
            facts["bootloader"] = {"mode": bl.mode, "name": bl.name} if bl else None

    def inventory_for(self, dev: DeviceConfig, slots: Slots) -> dict[str, Any]:
        """The inventory record the source gets with its check (``DeviceView.inventory``)."""
        facts = self._facts.get(dev.id, {})
        states = [s for s in (slots.active, slots.other) if s is not None]
        mode = (facts.get("bootloader") or {}).get("mode")
        rec = inventory.record(dev, slots=inventory.slots_of(states), params=facts.get("params"),
                               bootloader_mode=mode if mode is not None else facts.get("mcuboot_mode"),
                               facts=facts, entry=self.gw.journal.get(dev.id))
        self.ops.put_inventory(dev.id, rec)
        return rec

    # -- operator control --------------------------------------------------------------------
    def _dev(self, device_id: Any) -> DeviceConfig:
        for d in self.devices():
            if d.id == device_id:
                return d
        raise ControlError(f"no device {device_id!r} (ctl list shows the devices)")

    def _journal_event(self, device_id: str, detail: str) -> None:
        self.gw.journal.put(self.gw.journal.get(device_id), detail)

    async def handle(self, req: dict[str, Any], actor: str) -> Any:
        cmd = req["cmd"]
        target = str(req.get("device") or "")
        log.info("control %s %s by %s", cmd, target or "-", actor)
        if cmd == "list":
            return self.list_devices()
        if cmd == "status":  # read-only: what `smp-gateway status` shows beside a daemon
            return self.status_devices()
        if cmd == "rollout":
            return self.rollout.status()
        if cmd == "audit":
            return self.ops.audit_log(int(req.get("limit", 50)))
        if cmd == "rescan":
            if self.discovery is None:
                raise ControlError("discovery is not configured (no device_templates)")
            self.discovery.rescan(f"ctl by {actor}")
            self.ops.audit(actor, cmd, "*")
            return "rescan started"
        if cmd == "rollout-resume":
            art = str(req.get("artifact") or "")
            if not self.rollout.resume(art):
                raise ControlError(f"no rollout of artifact {art!r}")
            self.ops.audit(actor, cmd, art)
            return f"rollout of {art} resumed"
        if cmd in ("pause", "resume") and (req.get("all") or target == "*"):
            devs = self.devices()
            if cmd == "pause":
                self.ops.pause("*", f"{req.get('reason') or 'no reason given'} ({actor})")
            else:
                self.ops.resume("*")
                for d in devs:
                    self.ops.resume(d.id)
            for d in devs:
                self._journal_event(d.id, f"operator {cmd} (all) by {actor}")
                self.wake(d.id)
            self.ops.audit(actor, cmd, "*", str(req.get("reason") or ""))
            return f"{cmd}d {len(devs)} device(s)"
        dev = self._dev(target)
        if cmd == "device":  # smp-gateway device ID ...: journalled/audited in gateway.devcmd
            return await self.device_command(dev, req, actor)
        if cmd == "pause":
            reason = f"{req.get('reason') or 'no reason given'} ({actor})"
            self.ops.pause(dev.id, reason)
            result = f"{dev.id} paused: no new update starts (one in progress finishes its step)"
        elif cmd == "resume":
            if not self.ops.resume(dev.id) and self.ops.is_paused(dev.id):
                raise ControlError(f"{dev.id} is paused by 'pause --all': resume --all")
            self.wake(dev.id)
            result = f"{dev.id} resumed"
        elif cmd == "update":
            self._now[dev.id] = bool(req.get("ignore_window"))
            self._asked[dev.id] = f"operator ({actor})"
            self.wake(dev.id)
            result = (f"{dev.id}: update check now" + (" (maintenance window ignored)"
                                                       if req.get("ignore_window") else ""))
        elif cmd == "cancel":
            if self.request_cancel(dev.id, f"canceled by the operator ({actor})"):
                result = f"{dev.id}: cancel requested; the update is being taken back" + (
                    f" - the whole group {dev.group} (a group changes version all together or "
                    "not at all)" if dev.group else "")
            elif dev.group:
                raise ControlError(f"{dev.id}: its group {dev.group} is not installing anything now")
            else:
                raise ControlError(f"{dev.id} is not installing anything now")
        elif cmd == "unblock":
            e = self.gw.journal.get(dev.id)
            if not e.blocked_hash and not e.blocked_artifact:
                raise ControlError(f"{dev.id} has no blocked image")
            label = inventory.blocked_label(e)
            self.gw.journal.put(e.with_(blocked_hash=None, blocked_artifact=None),
                                f"operator unblock by {actor}: {label}")
            self.wake(dev.id)
            result = f"{dev.id}: {label} unblocked; it may be attempted again"
        else:
            raise ControlError(f"unknown command {cmd!r} (list, status, update, pause, resume, "
                               "cancel, unblock, rescan, rollout, rollout-resume, audit)")
        if cmd != "unblock":
            self._journal_event(dev.id, f"operator {cmd} by {actor}")
        self.ops.audit(actor, cmd, dev.id, result)
        log.info("control %s device=%s by %s: %s", cmd, dev.id, actor, result)
        return result

    def status_devices(self) -> dict[str, dict[str, Any]]:
        """What the daemon knows of each device, without opening one (the daemon holds the
        links: ``smp-gateway status`` asks here instead of opening a port the daemon has
        locked). Read-only: nothing journalled, nothing audited. ``slots``: as the daemon last
        read them from the device (``slots_at``), never a fleet server's word."""
        inv = self.ops.inventory()
        out: dict[str, dict[str, Any]] = {}
        for d in self.devices():
            e = self.gw.journal.get(d.id)
            rec = inv.get(d.id) or {}
            out[d.id] = {
                "in_session": d.id in self.gw.in_session, "step": e.step, "outcome": e.outcome,
                "upload": [e.upload_offset, e.upload_total],
                "running": e.running_version, "running_hash": e.running_hash,
                "slots": rec.get("slots"), "slots_at": rec.get("inventory_at"),
                "mcuboot_mode": rec.get("mcuboot_mode"), "mcumgr_params": rec.get("mcumgr_params"),
                "paused": self.ops.is_paused(d.id),
            }
        return out

    async def device_command(self, dev: DeviceConfig, req: dict[str, Any], actor: str) -> Any:
        """``smp-gateway device ID <command>`` while the daemon runs: inside ``gw.session``, so
        under the same per-device lock as the daemon's own sessions (never beside an update's
        session); the rules are ``gateway.devcmd``'s."""
        try:
            cmd = devcmd.DeviceCommand.from_request(req)
        except devcmd.DeviceCommandRefused as exc:
            raise ControlError(str(exc)) from None
        deadline = req.get("deadline")  # the client's: checked by devcmd before it acts
        try:
            async with self.gw.session(dev) as session:
                result = await devcmd.run(dev, session, cmd, self.gw.journal, self.ops, self.maint,
                                          actor, deadline=deadline if isinstance(
                                              deadline, int | float) else None)
        except devcmd.DeviceCommandRefused as exc:
            raise ControlError(str(exc)) from None
        except Stopping:
            raise ControlError("the gateway is stopping") from None
        except (SMPError, SMPTimeout, TransportError) as exc:
            raise ControlError(f"{dev.id}: {type(exc).__name__}: {exc}") from None
        log.info("control device %s device=%s by %s: %s", cmd.op, dev.id, actor, result)
        return result

    def note_outcome(self, out: Outcome) -> None:
        """Every counted outcome of an attempt: the journal's ``attempts`` (``smp-gateway
        history``: outcome, LwM2M code, bytes, duration, who asked) and the per-device series."""
        self.series.outcome(out)
        if out.status in (Status.UP_TO_DATE, Status.HELD):
            return
        e = self.gw.journal.get(out.device_id)
        asked = self._asked.pop(out.device_id, None) or f"server ({self.gw.source.name})"
        try:
            self.gw.journal.put_attempt({
                "device_id": out.device_id, "status": out.status.value, "result": int(out.result),
                "detail": out.detail, "old_version": out.old_version,
                "new_version": out.new_version or e.target_version, "target_hash": e.target_hash,
                "artifact_id": e.artifact_id, "source": e.source, "bytes": out.bytes_uploaded,
                "upload_seconds": out.upload_seconds, "resumed_from": out.resumed_from,
                "actor": asked, "grp": out.group})
        except Exception as exc:  # the history must never cost the outcome
            log.error("device=%s attempt not written to the history: %s", out.device_id, exc)

    def list_devices(self) -> list[dict[str, Any]]:
        out = []
        found = self.discovery.devices if self.discovery is not None else {}
        inv = self.ops.inventory()
        quarantined = self.ops.quarantined()
        for d in self.devices():
            e = self.gw.journal.get(d.id)
            f = found.get(d.id)
            out.append({
                "device": d.id, "group": d.group, "hardware": d.hardware,
                "transport": d.transport.kind,
                "address": inventory.record(d)["address"],
                "source": f"template {f.template}" if f else "static",
                "present": f.present if f else True,
                "paused": self.ops.is_paused(d.id),
                # journalled intents not finished yet (a cancel still to take back / acknowledge)
                "intents": [i.describe() for i in self.gw.journal.open_intents(d.id)],
                "in_session": d.id in self.gw.in_session,
                "step": e.step, "outcome": e.outcome, "running": e.running_version,
                "target": e.target_version, "blocked": inventory.blocked_label(e) or None,
                "window": self.maint.describe(d),
                "inventory_at": (inv.get(d.id) or {}).get("inventory_at"),
                "quarantine": quarantined.get(d.id),  # why no update may touch it now
                # device-side failures / park, and whether it waits for a backed-off server
                "parked": retry_label(self.gw.retry_state.get(d.id)) or None,
                "source_backoff": (self.gw.source_health.snapshot()
                                   if d.id in self.gw.source_waiting else None),
            })
        return out

