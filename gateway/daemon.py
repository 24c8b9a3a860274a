"""The gateway process: fleet source -> image store -> per-device engines, under limits.

Owns scheduling and the daemon's life cycle. Every device (or group of devices, see
``gateway.groups``) gets its own supervisor task that runs an attempt, then waits: the source's
polling interval after a finished update, exponential backoff with jitter after a failure
(``retry``), ``retry.park_s`` after ``retry.max_attempts`` failures in a row - device-side
failures only: a fleet server that is down or answers 5xx backs off the *source*
(``SourceHealth``: bounded exponential backoff with jitter, one probe per round), its devices
wait for it without being counted as failing, and are woken when it answers again. Parked
devices and the source's backoff are written to ``fleet.sqlite`` for ``status``/``ctl list``. An image that
rolled back or was refused is journaled as *blocked* for that device and not attempted again
until the source offers a different artifact. Sessions run under limits, acquired in this
order so a waiting device never holds a global slot: one session at a time per device address
(``device_address``: UDP host:port, serial port, BLE address - an asyncio.Lock here, plus
pyserial's exclusive flock on serial ports across processes), ``ble_per_adapter``
per BLE adapter, then the global ``max_concurrent``. One device's failure never stalls another.

Stopping (``stop`` set by SIGTERM/SIGINT): nothing new starts; uploads in flight are cancelled
at once (the engine checkpoints the acknowledged offset; the device keeps its upload context,
so the next start resumes there); sessions past the upload get the rest of ``stop_timeout_s``
to finish their step, then are cancelled too. Every step is journaled before it runs, so a
cancelled session is picked up where it was by the next start.

``run_once`` is one attempt per device/group (``--once``); ``run_forever`` is the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway import inventory
from gateway.config import (
    BleTransport,
    ConfigError,
    DeviceConfig,
    GatewayConfig,
    SerialTransport,
    UdpTransport,
)
from gateway.download import sha256_file
from gateway.engine import Outcome, Slots, Stage, Status, Step, UpdateEngine, set_revert_open
from gateway.fleetops import FleetOps  # discovery, rollout, windows, cancel, ctl
from gateway.groups import GroupRunner
from gateway.images import ImageRefused, ImageStore, VerifiedImageSet
from gateway.journal import STAGED, Entry, FinalReport, Journal
from gateway.maintenance import both_gates
from gateway.mcuboot import IMAGE_MAGIC, TrustedKey, Version, read_version
from gateway.metrics import Metrics, MetricsServer
from gateway.plan import Plan, Stopping
from gateway.smp.ble import BleLink, adapter_key  # the BLE stacks themselves load lazily
from gateway.smp.session import SMPError, SMPSession, SMPTimeout, UploadError
from gateway.smp.transport import SerialTransport as SerialLink
from gateway.smp.transport import Transport, TransportError
from gateway.smp.transport import UdpTransport as UdpLink
from gateway.sources import build_source
from gateway.sources.base import (
    DeviceView,
    FetchError,
    FleetSource,
    NotYetAccepted,
    Offer,
    Report,
    ReportNotDelivered,
    ReportRefused,
    ServerCanceled,
    SourceHealth,
    UpdateResult,
    UpdateState,
)
from gateway.statelock import StateDirLock
from gateway.systemd import Notifier, watchdog_interval, watchdog_loop

log = logging.getLogger("gateway")

ProgressFn = Callable[[str, str, int, int], None]


def make_transport(dev: DeviceConfig) -> Transport:
    t = dev.transport
    if isinstance(t, UdpTransport):
        return UdpLink(t.host, t.port, t.mtu)
    if isinstance(t, SerialTransport):
        return SerialLink(t.port, t.baud, t.line_length, t.mtu, t.shell)
    if isinstance(t, BleTransport):
        return BleLink(t)  # type: ignore[no-any-return,unused-ignore]
    raise ValueError(f"unsupported transport {t!r}")


def device_address(dev: DeviceConfig) -> str:
    """What identifies the physical device behind a config entry: UDP ``host:port``, the serial
    port (symlinks such as /dev/serial/by-id/... resolved), the BLE address (else its name).

    Entries that share it (``image: 0`` and ``image: 1`` of one MCU, a device listed twice) are
    one device: their sessions must never overlap, since one entry's reset reboots the device
    under the other's upload or test boot.
    """
    t = dev.transport
    if isinstance(t, UdpTransport):
        return f"udp:{t.host.lower()}:{t.port}"
    if isinstance(t, SerialTransport):
        return f"serial:{os.path.realpath(t.port)}"
    if isinstance(t, BleTransport):
        return f"ble:{t.address.upper()}" if t.address else f"ble-name:{t.name}"
    return f"{type(t).__name__}:{t!r}"



class SourceBackingOff(Exception):
    """The fleet server is being backed off: this device's check is not sent now."""


class SupervisorDied(RuntimeError):
    """A device's supervisor ended while the daemon was running (a bug): the process must exit
    non-zero so that its service manager restarts it (systemd ``Restart=on-failure``)."""


@dataclass
class Pass:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes.values())


def _server_side(exc: BaseException) -> bool:
    """A check failure that is the fleet server's (unreachable, timeout, 5xx/unusable answer
    reported as a lost connection), not the device's."""
    if isinstance(exc, FetchError):
        return exc.result == UpdateResult.CONNECTION_LOST
    return isinstance(exc, OSError | TimeoutError)


def _file_sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _claimed_version(path: Path) -> str | None:
    """The version an (unusable) image's header claims: for naming it to the operator only."""
    try:
        with path.open("rb") as f:
            head = f.read(32)
        if len(head) >= 28 and int.from_bytes(head[:4], "little") == IMAGE_MAGIC:
            return str(read_version(head))
    except (OSError, ValueError):
        pass
    return None


def backoff_delay(failures: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """``min(max_s, base_s * 2**(failures-1))`` with +-50 % jitter (de-synchronises a fleet)."""
    return min(max_s, base_s * 2 ** max(0, failures - 1)) * rng.uniform(0.5, 1.5)


class Gateway:
    def __init__(self, cfg: GatewayConfig, *, source: FleetSource | None = None,
                 on_progress: ProgressFn | None = None, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        keys = []
        for i, p in enumerate(cfg.trusted_keys):
            try:
                keys.append(TrustedKey.load(p))
            except (ValueError, OSError) as exc:
                raise ConfigError(cfg.config_path or "<config>", f"trusted_keys[{i}]",
                                  f"{exc}; give a PEM public or private key (imgtool getpub / "
                                  "imgtool keygen) that the gateway user can read") from exc
        # one writer per state directory (c: the gateway's own configuration names it): a
        # second process on it is refused with the holder's PID before anything is opened
        self._state_lock = StateDirLock(cfg.state_dir, cfg.config_path or "<config>")
        self._state_lock.acquire()
        try:
            self.store = ImageStore(cfg.state_dir / "images", keys)
            self.journal = Journal(cfg.state_dir / "journal.sqlite")
        except (OSError, sqlite3.Error) as exc:
            self._state_lock.release()
            raise ConfigError(cfg.config_path or "<config>", "state_dir",
                              f"{cfg.state_dir}: {exc}; give a directory the gateway user can "
                              "write") from exc
        self.source = source or build_source(cfg)
        # a server outage backs off the source, never the devices (see the module docstring)
        self.source_health = SourceHealth(self.source.name, cfg.retry.base_s, cfg.retry.max_s,
                                          on_change=self._source_changed)
        self.source_waiting: set[str] = set()  # devices whose last attempt waited for the source
        self.retry_state: dict[str, dict[str, object]] = {}  # device -> failures / park (status)
        self.on_progress = on_progress
        self.notifier = notifier or Notifier()
        self.stop = asyncio.Event()  # set: start nothing new
        self._sem = asyncio.Semaphore(cfg.max_concurrent)
        self._port_locks: dict[str, asyncio.Lock] = {}
        self._ble_sems: dict[str, asyncio.Semaphore] = {}
        self.sessions_active = 0
        self.sessions_peak = 0
        self.in_session: set[str] = set()
        self.steps: dict[str, str] = {e.device_id: e.step for e in self.journal.all()}
        self.last: dict[str, Outcome] = {}
        self._blocked_logged: dict[str, str] = {}
        self.metrics = Metrics()
        self._describe_metrics()
        self.metrics_server: MetricsServer | None = None
        # final reports: per-device delivery lock, in-process retry schedule (a restart retries
        # at once), and the clock it runs on
        self._report_locks: dict[str, asyncio.Lock] = {}
        self._report_due: dict[int, float] = {}
        self._report_rng = random.Random()
        self.clock: Callable[[], float] = time.monotonic
        self.groups = GroupRunner(self)

        self.fleet = FleetOps(self)
        hooks = getattr(self.source, "set_waker", None), getattr(self.source, "set_reboot", None)
        if hooks[0] is not None and hooks[1] is not None:  # a source driven by server events (LwM2M)
            hooks[0](self.fleet.wake)
            hooks[1](self.reboot_device)
        elif hooks[0] is not None:  # a source with server events but no reboot (IoT Hub)
            hooks[0](self.fleet.wake)
        control = getattr(self.source, "set_control", None)
        if control is not None:  # IoT Hub direct methods: the very path of ``smp-gateway ctl``
            control(self.fleet.handle)

    async def reboot_device(self, device_id: str) -> str | None:
        """A server's Reboot (LwM2M /3/0/4): an SMP reset through the maintenance-window gate
        (c), never while the journal holds an update or an intent (a cancel) of the device open
        (a reset could start a test boot nobody is watching). None when the device acknowledged
        it, else why not.
        A session open now (a status check) is waited for, not taken for an update; both
        checks are made again once the session is this one's (the caller bounds the wait)."""
        dev = next((d for d in self.fleet.devices() if d.id == device_id), None)
        if dev is None:
            return "not a device of this gateway"
        gate = self.fleet.reset_gate(dev)

        def refused() -> str | None:
            why = gate()
            if why is not None:
                return f"outside the maintenance windows ({why})"
            e = self.journal.get(dev.id)
            if e.outcome is None and e.target_hash:
                return "an update of the device is in progress"
            if self.journal.open_intents(dev.id):
                # e.g. a cancel whose revert waits (``cancel-pending``, its row closed): a reset
                # now would test-boot the canceled image outside the take-back that owns it
                return "a cancel of an update of the device is not finished"
            return None

        if (why := refused()) is not None:
            return why
        async with self.session(dev) as s:
            if (why := refused()) is not None:
                return why
            return None if await s.reset() else "the device did not acknowledge the reset"

    def close(self) -> None:
        self.fleet.close()
        self.journal.close()
        self.notifier.close()
        self._state_lock.release()

    # -- units of scheduling: a device on its own, or a group --------------------------------
    def units(self) -> list[tuple[str, list[DeviceConfig]]]:
        """(key, devices): ``device:<id>`` for a lone device, ``group:<name>`` for a group."""
        out: list[tuple[str, list[DeviceConfig]]] = []
        groups: dict[str, list[DeviceConfig]] = {}
        for d in self.fleet.devices():  # devices: + what discovery found
            if d.group is None:
                out.append((f"device:{d.id}", [d]))
            else:
                if d.group not in groups:
                    groups[d.group] = []
                    out.append((f"group:{d.group}", groups[d.group]))
                groups[d.group].append(d)
        return out

    async def attempt(self, key: str, devs: list[DeviceConfig]) -> list[Outcome]:
        """One attempt of a unit; never raises (but for cancellation): an unexpected exception
        is a FAILED outcome of every device of the unit (logged with its traceback)."""
        await self.fleet.before_attempt()  # holding no session: a rollout's end-of-soak check
        for d in devs:
            self.source_waiting.discard(d.id)
        try:
            if key.startswith("group:"):
                held = self.fleet.gate_group(key, devs)  # paused / outside a window: untouched
                if held:
                    for d in devs:  # pending final reports need only the server, not the group
                        await self.flush_unreported(d)
                    outs = held
                else:
                    outs = await self.groups.run(key[len("group:"):], devs)
            else:
                outs = [await self.update_device(devs[0])]
        except Exception as exc:
            log.error("unit=%s attempt failed with an unexpected error: %s: %s", key,
                      type(exc).__name__, exc, exc_info=exc)
            outs = [self._count(self._fail(d, UpdateResult.UPDATE_FAILED,
                                           f"internal error {type(exc).__name__}: {exc}"))
                    for d in devs]
        for o in outs:
            self.last[o.device_id] = o
        self.fleet.finished(key, outs)  # staged rollout accounting
        return outs

    # -- limits ------------------------------------------------------------------------------
    def _port_lock(self, dev: DeviceConfig) -> asyncio.Lock:
        """One session at a time per physical device (``device_address``), any transport."""
        return self._port_locks.setdefault(device_address(dev), asyncio.Lock())

    def _ble_sem(self, dev: DeviceConfig) -> asyncio.Semaphore | None:
        if isinstance(dev.transport, BleTransport):
            a = adapter_key(dev.transport)
            cap = self.cfg.ble_adapters.get(a, self.cfg.ble_per_adapter)
            return self._ble_sems.setdefault(a, asyncio.Semaphore(cap))
        return None

    @contextlib.asynccontextmanager
    async def session(self, dev: DeviceConfig) -> AsyncIterator[SMPSession]:
        """An open session with ``dev`` under every limit; raises Stopping when shutting down."""
        async with contextlib.AsyncExitStack() as st:
            if self.stop.is_set():
                raise Stopping()
            self.fleet.identity.before(dev)  # a quarantined device: not a byte (discovery.guard)
            await st.enter_async_context(self._port_lock(dev))
            ble = self._ble_sem(dev)
            if ble is not None:
                await st.enter_async_context(ble)
            await st.enter_async_context(self._sem)
            if self.stop.is_set():
                raise Stopping()
            self.sessions_active += 1
            self.sessions_peak = max(self.sessions_peak, self.sessions_active)
            self.in_session.add(dev.id)

            def done() -> None:
                self.sessions_active -= 1
                self.in_session.discard(dev.id)

            st.callback(done)
            session = SMPSession(self.fleet.transport(dev) or make_transport(dev), device_id=dev.id,
                                 timeout_s=dev.timeouts.request_s)
            # a BLE link bounds its scan and connection itself (scan_timeout_s, connect_
            # timeout_s) and names what failed: our deadline must not cut its reason short
            deadline = max(dev.timeouts.connect_s,
                           getattr(session.transport, "open_deadline_s", 0.0))
            try:
                await asyncio.wait_for(session.open(), deadline)
            except (TransportError, TimeoutError) as exc:
                await session.close()
                why = str(exc) or f"no link within {deadline:g}s ({type(exc).__name__})"
                raise TransportError(f"cannot open link: {why}") from exc
            st.push_async_callback(session.close)
            await session.mcumgr_params(timeout_s=min(2.0, dev.timeouts.request_s))
            await self.fleet.identity.check(dev, session)  # another board there: IdentityRefused
            yield session

    def engine(self, dev: DeviceConfig, session: SMPSession) -> UpdateEngine:
        eng = UpdateEngine(dev, session, self.journal, on_progress=self._progress_cb(dev))
        eng.reset_gate = self.fleet.reset_gate(dev)  # no mark/reset outside a window, ever
        return eng

    # -- one device, one attempt -------------------------------------------------------------
    async def update_device(self, dev: DeviceConfig) -> Outcome:
        """One device, one attempt. Never raises (but for cancellation): problems are Outcomes."""
        offer: Offer | None = None
        await self.flush_unreported(dev)
        try:
            async with self.session(dev) as session:
                # journalled intents (a cancel) are finished first, paused or not
                pending = await self.fleet.finish_intents(dev, session)
                if pending is not None:
                    return pending
                recovered = await self.fleet.last_resort(dev, session)  # recovery.last_resort
                if recovered is not None:
                    return self._count(recovered)
                plan = await self.plan(dev, session)
                if isinstance(plan, Outcome):
                    return plan
                offer = plan.offer
                adm = await self.fleet.admit(f"device:{dev.id}", dev, offer)  # pause/rollout/window
                if not adm.go:
                    return adm.held(dev)
                await self._report(offer, Report(UpdateState.UPDATING, progress=0.0))
                self.metrics.inc("updates_started_total")
                eng = self.engine(dev, session)
                eng.on_progress = self._progress_cb(dev, offer)  # upload progress upstream
                src_gate = getattr(self.source, "install_gate", None)  # e.g. hawkBit's window
                if src_gate is not None:
                    eng.reset_gate = both_gates(src_gate(offer), eng.reset_gate)
                if adm.ignore_window:
                    eng.reset_gate = None
                # the source asked (bounded) right before the confirm: still wanted?
                eng.confirm_gate = self.fleet.confirm_gate(dev, offer, plan.image.hash.hex())
                out = await self.fleet.run_engine(  # watches for a cancel; undoes as far as it got
                    dev, offer, plan.image.hash, session,
                    lambda: eng.run(plan.image, None, artifact_id=offer.artifact_id,
                                    source=offer.source, until=adm.until))
                if out.status == Status.HELD and adm.until != Stage.CONFIRMED:
                    self.fleet.after_hold(dev, offer)
                    return await self.staged(dev, offer, out, adm.reason)
                if out.status in (Status.ROLLED_BACK, Status.REFUSED):
                    self.block(dev.id, plan.image.hash.hex(), offer.artifact_id)
                return await self.final(offer, out)
        except Stopping:
            return Outcome(dev.id, Status.FAILED, UpdateResult.INITIAL, "gateway stopping")
        except (SMPTimeout, TransportError) as exc:
            out = self._fail(dev, UpdateResult.CONNECTION_LOST, f"{type(exc).__name__}: {exc}")
        except (SMPError, UploadError) as exc:
            out = self._fail(dev, UpdateResult.UPDATE_FAILED, str(exc))
        except (OSError, sqlite3.Error) as exc:  # the gateway's own disk (ENOSPC, EROFS, EACCES)
            out = self._fail(dev, UpdateResult.UPDATE_FAILED,
                             f"gateway state directory {self.cfg.state_dir}: {exc}; free space or "
                             "fix permissions there (the update stopped before its next step)")
        except Exception as exc:  # a bug costs this device this attempt, never the daemon
            log.error("device=%s attempt failed with an unexpected error: %s: %s", dev.id,
                      type(exc).__name__, exc, exc_info=exc)
            out = self._fail(dev, UpdateResult.UPDATE_FAILED,
                             f"internal error {type(exc).__name__}: {exc}")
        return await self.final(offer, out) if offer else self._count(out)

    async def plan(self, dev: DeviceConfig, session: SMPSession) -> Plan | Outcome:
        """Read the device, find its target (journal first), fetch and verify the image.

        An Outcome when there is nothing to do (up to date, blocked) or it cannot be done; an
        outcome about an offer (refused, blocked, download failed) is a final report like any
        other (journaled, then delivered). The offer's report handle is journaled before the
        update starts, so its reports can be sent by a restarted gateway.
        """
        engine = self.engine(dev, session)
        slots = await engine.read_slots()
        self.journal.put(engine.entry, "read")  # running version/hash for `status`
        await self.fleet.note_session(dev, session)  # for the inventory the source gets
        try:
            offer, resume_path = await self._target(dev, slots)
        except SourceBackingOff as exc:
            return self._source_wait(dev, str(exc))
        except ServerCanceled as exc:  # journalled as an intent, taken back, acknowledged
            return await self.fleet.server_cancel(dev, session, exc)
        except NotYetAccepted as exc:  # waits for the server's administrator: held, not ok
            return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL, str(exc),
                           old_version=slots.running, new_version=slots.running)
        except Exception as exc:
            self.metrics.inc("source_errors_total", source=self.source.name, op="check")
            hint = getattr(exc, "hint", None) or "check the source's url in the config and the network"
            detail = (f"source check ({self.source.name}): {exc}; {hint} "
                      "(the device was not touched)")
            if _server_side(exc):  # the server's outage, not the device's failure
                return self._source_wait(dev, detail)
            # e.g. a local manifest that does not validate: its own result, not a lost link
            result = exc.result if isinstance(exc, FetchError) else UpdateResult.CONNECTION_LOST
            return self._fail(dev, result, detail)
        if offer is None and slots.active is not None and not slots.active.confirmed:
            # e.g. someone else's test boot: it is not settled, and not ours to confirm
            return self._fail(dev, UpdateResult.UPDATE_FAILED,
                              f"device is test-running unconfirmed {slots.active.version}, which "
                              "this gateway did not test; refusing to confirm it")
        if offer is None:
            entry = engine.entry.with_(step=Step.DONE.value)
            if ((entry.outcome is None and entry.target_hash is not None)
                    or entry.outcome == Status.FAILED.value):
                entry = entry.with_(outcome=Status.UP_TO_DATE.value)
            if entry.outcome not in (Status.ROLLED_BACK.value, Status.REFUSED.value):
                entry = entry.with_(last_error=None)  # a success: an earlier error is stale now
            self.journal.put(entry, "up to date")
            self.steps[dev.id] = Step.DONE.value
            v = slots.running
            log.info("device=%s up-to-date version=%s", dev.id, v)
            return self._count(Outcome(dev.id, Status.UP_TO_DATE, UpdateResult.SUCCESS,
                                       f"running {v}", old_version=v, new_version=v))
        entry = self.journal.get(dev.id)
        if resume_path is None and entry.blocked_artifact == offer.artifact_id:
            return await self._refusal(offer, self._blocked(dev, entry.blocked_artifact))
        path = resume_path
        if path is None:
            await self._report(offer, Report(UpdateState.DOWNLOADING))
            try:
                path = await self.source.fetch(offer, dev.slot_size)
            except ServerCanceled as exc:  # canceled during the download: as in check()
                return await self.fleet.server_cancel(dev, session, exc)
            except FetchError as exc:
                self.metrics.inc("source_errors_total", source=self.source.name, op="fetch")
                if exc.permanent:
                    # the server's own bytes (its checksum matched) cannot be used: refused and
                    # blocked by the artifact id (derived from that checksum), reported once
                    detail = f"download: {exc}"
                    log.warning("device=%s refused artifact=%s %s", dev.id, offer.artifact_id,
                                detail)
                    self._offer_outcome(engine.entry, offer, Status.REFUSED, detail,
                                        blocked_hash=offer.sha256 or offer.artifact_id)
                    return await self.final(offer, Outcome(
                        dev.id, Status.REFUSED, exc.result, detail, old_version=slots.running,
                        new_version=str(offer.version) if offer.version else None))
                out = self._fail(dev, exc.result, f"download: {exc}")
                self._offer_outcome(engine.entry, offer, Status.FAILED, out.detail)
                return await self.final(offer, out)
            await self._report(offer, Report(UpdateState.DOWNLOADED))
        try:
            # off the event loop: a hostile artifact costs a worker thread, not every device
            image = await self.store.add_file_async(
                path, hardware=offer.hardware, allow_unsigned=dev.allow_unsigned,
                max_image_size=dev.slot_size and max(
                    [dev.slot_size, *(r.slot_size or 0 for r in dev.images.values())]))
        except ImageRefused as exc:
            out = Outcome(dev.id, Status.REFUSED, exc.reason.lwm2m, str(exc),
                          old_version=slots.running,
                          new_version=str(offer.version) if offer.version else None)
            log.warning("device=%s refused reason=%s %s", dev.id, exc.reason.value, exc.message)
            # blocked by the artifact id and named by the refused bytes' sha256 (never executed:
            # the header's version is for the operator's eyes only)
            self._offer_outcome(engine.entry, offer, Status.REFUSED, str(exc),
                                blocked_hash=_file_sha256(path), version=_claimed_version(path))
            return await self.final(offer, out)
        if resume_path is None and entry.blocked_hash == image.hash.hex():
            return await self._refusal(offer, self._blocked(dev, offer.artifact_id))
        if resume_path is None:
            self.journal.set_report_handle(dev.id, offer.report_handle())
        return Plan(dev, offer, image, resumed=resume_path is not None)

    async def _target(self, dev: DeviceConfig, slots: Slots) -> tuple[Offer | None, Path | None]:
        """The journal's unfinished update wins over the source (resume after a crash).

        Unfinished also means: an attempt failed (e.g. the link dropped during the health
        check, or the confirm's answer was lost) while the device runs the image this gateway
        marked (``tested_hash``): the next attempt health-checks and confirms it - or finds it
        confirmed and reports the update done - rather than leaving it unconfirmed, or the
        server believing the failure (the source may not offer the version the device runs).
        The same after a rollback verdict: a device that runs the image this gateway marked
        booted it after all, and a test boot this gateway started is finished by it."""
        entry = self.journal.get(dev.id)
        tested_running = (entry.outcome in (Status.FAILED.value, Status.ROLLED_BACK.value)
                          and entry.tested_hash is not None
                          and slots.active_hash is not None
                          and entry.tested_hash == slots.active_hash.hex())
        if entry.outcome in (Status.FAILED.value, Status.ROLLED_BACK.value) and not tested_running:
            # an image set's test boot this gateway started is finished by it too, whatever is
            # offered: its revert intent still open, or (b) the device test-runs (unconfirmed)
            # a member of the set this gateway marked (a hash of its (a) signed images)
            tested_running = set_revert_open(entry) or (
                entry.tested_hash is not None and entry.tested_hash == entry.target_hash
                and slots.active is not None and not slots.active.confirmed
                and await self._runs_set_member(dev, entry, slots))
        if ((entry.outcome is None or tested_running) and entry.target_hash and entry.image_path
                and Path(entry.image_path).is_file()):
            log.info("device=%s resuming step=%s target=%s", dev.id, entry.step, entry.target_version)
            return self.offer_from_journal(dev), Path(entry.image_path)
        view = DeviceView(id=dev.id, hardware=dev.hardware, running_version=slots.active_version,
                          running_hash=slots.active_hash, group=dev.group,
                          inventory=self.fleet.inventory_for(dev, slots))
        health = self.source_health
        if not health.may_contact():
            raise SourceBackingOff(f"waiting for {self.source.name} (backing off after "
                                   f"{health.failures} failed check(s): {health.last_error})")
        try:
            offer = await self.source.check(view)
        except NotYetAccepted:  # an answer: the server is up
            if health.succeeded():
                for d in list(self.source_waiting):
                    self.fleet.wake(d)
            raise
        except Exception as exc:
            if _server_side(exc):
                health.failed(str(exc))
            else:
                health.release()
            raise
        except BaseException:
            health.release()
            raise
        if health.succeeded():  # the outage is over: the devices that waited for it go now
            for d in list(self.source_waiting):
                self.fleet.wake(d)
        return offer, None

    async def _runs_set_member(self, dev: DeviceConfig, entry: Entry, slots: Slots) -> bool:
        """The journal's target is an image set (from the store, where it was verified) and the
        device's active image is one of its members."""
        if not entry.image_path or not Path(entry.image_path).is_file():
            return False
        try:
            iset = await self.store.add_file_async(Path(entry.image_path), hardware=None,
                                                   allow_unsigned=dev.allow_unsigned)
        except (ImageRefused, OSError) as exc:
            log.warning("device=%s journalled image set %s unreadable: %s", dev.id,
                        entry.image_path, exc)
            return False
        return isinstance(iset, VerifiedImageSet) and any(
            m.image == dev.image and m.hash == slots.active_hash for m in iset.members)

    def offer_from_journal(self, dev: DeviceConfig) -> Offer:
        """The offer of the device's journaled update, with its journaled report handle."""
        entry = self.journal.get(dev.id)
        source = entry.source or self.source.name
        artifact = entry.artifact_id or entry.target_hash or "?"
        handle = self.journal.report_handle(dev.id) or {}
        report_to: dict[str, object] = {}
        install = "forced"
        if handle.get("artifact_id") == artifact and handle.get("source") == source:
            report_to = dict(handle.get("report_to") or {})
            install = str(handle.get("install") or "forced")
        else:
            log.warning("device=%s no report handle journaled for artifact=%s: %s may not accept "
                        "the reports of this update", dev.id, artifact, source)
        return Offer(device_id=dev.id, source=source, artifact_id=artifact,
                     version=Version.parse(entry.target_version) if entry.target_version else None,
                     hardware=None, report_to=report_to, install=install)

    def _source_wait(self, dev: DeviceConfig, detail: str) -> Outcome:
        """The source is backed off: not the device's failure (not journaled, not counted; the
        supervisor waits for the source). One log line per source state change, not per poll."""
        self.source_waiting.add(dev.id)
        log.debug("device=%s waits for the source: %s", dev.id, detail)
        return Outcome(dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST, detail)

    def _source_changed(self, health: SourceHealth) -> None:
        try:
            self.fleet.ops.put_source(health.name, health.snapshot())
        except sqlite3.Error as exc:
            log.error("source=%s state not written to fleet.sqlite: %s", health.name, exc)

    def _set_retry(self, devs: list[DeviceConfig], data: dict[str, object] | None) -> None:
        """Device-side failures in a row and the park, for status / ctl list / metrics."""
        for d in devs:
            if data is None and d.id not in self.retry_state:
                continue
            if data is None:
                self.retry_state.pop(d.id, None)
            else:
                self.retry_state[d.id] = dict(data)
            try:
                self.fleet.ops.put_retry(d.id, data)
            except sqlite3.Error as exc:
                log.error("device=%s retry state not written to fleet.sqlite: %s", d.id, exc)

    def _offer_outcome(self, prev: Entry, offer: Offer, status: Status, detail: str, *,
                       blocked_hash: str | None = None, version: str | None = None) -> None:
        """Journal an outcome decided about ``offer`` before the engine ran (download failed,
        refused), so that ``status`` shows this attempt's target and outcome, not the previous
        update's. A row of an unfinished update (or one whose test boot this gateway must
        still finish, or a staged download) keeps its update fields; only the error and the
        block are added to it."""
        dev_id = prev.device_id
        block: dict[str, object] = ({"blocked_hash": blocked_hash,
                                     "blocked_artifact": offer.artifact_id}
                                    if blocked_hash is not None else {})
        tested_running = (prev.tested_hash is not None and prev.tested_hash == prev.running_hash
                          and prev.outcome in (Status.FAILED.value, Status.ROLLED_BACK.value))
        if ((prev.outcome is None and prev.target_hash is not None) or tested_running
                or prev.outcome == STAGED):
            entry = prev.with_(last_error=detail, **block)
        else:
            step = Step.REFUSED if status == Status.REFUSED else Step.FAILED
            entry = Entry(device_id=dev_id, step=step.value, outcome=status.value,
                          target_version=version or (str(offer.version) if offer.version else None),
                          artifact_id=offer.artifact_id, source=offer.source,
                          old_hash=prev.running_hash, old_version=prev.running_version,
                          attempts=prev.attempts, last_error=detail,
                          running_version=prev.running_version, running_hash=prev.running_hash,
                          blocked_hash=prev.blocked_hash, blocked_artifact=prev.blocked_artifact,
                          updated_at=time.time()).with_(**block)
            self.steps[dev_id] = step.value
        self.journal.put(entry, detail)

    # -- blocking: never retry a rolled-back or refused image endlessly ----------------------
    def block(self, device_id: str, image_hash: str | None, artifact_id: str | None) -> None:
        entry = self.journal.get(device_id)
        self.journal.put(entry.with_(blocked_hash=image_hash, blocked_artifact=artifact_id),
                         f"blocked until the source offers another artifact than {artifact_id}")

    def _blocked(self, dev: DeviceConfig, artifact: str | None) -> Outcome:
        entry = self.journal.get(dev.id)
        try:
            status = Status(entry.outcome or "failed")
        except ValueError:
            status = Status.FAILED
        if status not in (Status.ROLLED_BACK, Status.REFUSED):
            status = Status.ROLLED_BACK
        # name the blocked image (its version when the journal knows it, and its hash), never
        # the journal's current target: that may be the version the device runs now
        b = inventory.blocked_of(entry) or {}
        name = " ".join(str(x) for x in (b.get("version") or "version unknown",
                                         (b.get("hash") or "")[:16]) if x) or str(artifact)
        detail = (f"not re-attempting {name} (artifact {artifact}): it {status.value} before "
                  f"({entry.last_error or '-'}); waiting for a different artifact")
        if self._blocked_logged.get(dev.id) != artifact:
            self._blocked_logged[dev.id] = artifact or ""
            log.warning("device=%s blocked artifact=%s %s", dev.id, artifact, detail)
        return Outcome(dev.id, status, UpdateResult.UPDATE_FAILED, detail,
                       old_version=entry.running_version, new_version=entry.target_version,
                       group=dev.group)

    async def _refusal(self, offer: Offer, out: Outcome) -> Outcome:
        """A refusal decided before the device is touched (blocked artifact): reported once.

        The same offer (same report handle) refused again at every poll is not re-reported."""
        if self.journal.has_report(out.device_id, offer.report_handle()):
            return out
        return await self.final(offer, out)

    # -- outcomes, reports, metrics ----------------------------------------------------------
    def fail(self, dev: DeviceConfig, result: UpdateResult, detail: str) -> Outcome:
        """A FAILED outcome, logged and written to the journal's ``last_error``."""
        log.error("device=%s failed result=%s detail=%r", dev.id, result.name, detail)
        try:
            entry = self.journal.get(dev.id)
            self.journal.put(entry.with_(last_error=detail), detail)
        except sqlite3.Error as exc:  # a full disk must not hide the outcome
            log.error("device=%s journal not written: %s", dev.id, exc)
        return Outcome(dev.id, Status.FAILED, result, detail)

    _fail = fail

    def _count(self, out: Outcome) -> Outcome:
        self.fleet.note_outcome(out)  # history (journal attempts), per-device metrics
        if out.status not in (Status.UP_TO_DATE, Status.HELD):
            self.metrics.inc("updates_finished_total", status=out.status.value,
                             reason=out.result.name.lower())
        if out.bytes_uploaded:
            self.metrics.inc("upload_bytes_total", out.bytes_uploaded)
            self.metrics.inc("upload_seconds_total", out.upload_seconds)
            if out.upload_seconds > 0:
                self.metrics.set("upload_throughput_bytes_per_second",
                                 out.bytes_uploaded / out.upload_seconds, device=out.device_id)
        return out

    def _progress_cb(self, dev: DeviceConfig,
                     offer: Offer | None = None) -> Callable[[str, Step, int, int], None]:
        """With ``offer``: upload progress goes to the source too (one report in flight at a
        time; the source bounds the rate it sends upstream)."""
        inflight: list[asyncio.Task[bool]] = []
        steps: list[asyncio.Task[bool]] = []

        def cb(device_id: str, step: Step, off: int, total: int) -> None:
            self.steps[device_id] = step.value
            if self.on_progress:
                self.on_progress(device_id, step.value, off, total)
            if offer is not None and step == Step.UPLOAD and total and not (
                    inflight and not inflight[0].done()):
                inflight[:] = [asyncio.ensure_future(self._report(
                    offer, Report(UpdateState.UPDATING, progress=off / total)))]
            elif offer is not None and step != Step.UPLOAD and getattr(
                    self.source, "reports_steps", False):  # AWS OTA: self_test ready / active
                steps[:] = [t for t in steps if not t.done()] + [asyncio.ensure_future(
                    self._report(offer, Report(UpdateState.UPDATING, detail=f"step:{step.value}")))]
        return cb

    async def _report(self, offer: Offer, report: Report) -> bool:
        """A progress report: best effort (a report that fails must not fail the update)."""
        try:
            await self.source.report(offer, report)
            return True
        except Exception as exc:
            self.metrics.inc("source_errors_total", source=self.source.name, op="report")
            log.warning("device=%s progress report to %s not delivered: %s", offer.device_id,
                        self.source.name, exc)
            return False

    async def staged(self, dev: DeviceConfig, offer: Offer, out: Outcome, reason: str) -> Outcome:
        """The engine stopped where the admission allowed (download-only, outside a window):
        the image sits in the secondary slot; DOWNLOADED is reported, no final report."""
        out.detail = reason
        await self._report(offer, Report(UpdateState.DOWNLOADED, detail=reason))
        return await self.final(offer, out)

    async def final(self, offer: Offer | None, out: Outcome) -> Outcome:
        """Count the outcome; about an offer, journal its final report, then deliver it.

        The report stays pending in the journal until the source took it (``flush_unreported``
        retries it with backoff, also after a restart)."""
        self._count(out)
        if offer is None or out.status == Status.HELD:
            return out
        if out.result == UpdateResult.INITIAL and out.status != Status.UP_TO_DATE:
            # a final report always carries a result: INITIAL (0) reads as "nothing happened"
            log.error("device=%s %s outcome without a result code: reported as UPDATE_FAILED",
                      out.device_id, out.status.value)
            out.result = UpdateResult.UPDATE_FAILED
        detail = f"{out.status.value}: {out.detail}"
        try:
            rep = self.journal.queue_report(out.device_id, offer.report_handle(), int(out.result),
                                            detail)
        except sqlite3.Error as exc:  # a full disk: send it once anyway, it cannot be kept
            log.error("device=%s final report not journaled (%s): sending it once, unjournaled",
                      out.device_id, exc)
            await self._report(offer, Report(UpdateState.IDLE, out.result,
                                             1.0 if out.result == UpdateResult.SUCCESS else None,
                                             detail))
            return out
        try:
            # oldest first (an earlier report of the device still pending - e.g. taken by the
            # server without an answer - goes before this one, so the server's last word is
            # this outcome); tried now, whatever its backoff: a new outcome is to be sent now
            for r in self.journal.unreported(out.device_id):
                if r.id > rep.id or await self._deliver(r) == "failed":
                    break
        except sqlite3.Error as exc:  # the report stays pending; flush_unreported retries it
            log.error("device=%s final report=%d: journal not writable: %s", out.device_id, rep.id,
                      exc)
        return out

    async def flush_unreported(self, dev: DeviceConfig) -> None:
        """Deliver the device's pending final reports (oldest first) whose retry time has come.

        First queues an outcome the engine journaled that was never turned into a report (the
        gateway was killed in between). Needs the fleet server only, not the device. A report
        that does not get through waits ``backoff_delay`` (``retry``) before the next try in
        this process; a restarted gateway tries at once. While the source is backed off
        (``SourceHealth``) they wait for it to answer a check again.
        """
        try:
            self._adopt_unreported(dev)
            if self.source_health.down:
                return  # the server is backed off: sent once a check gets an answer again
            now = self.clock()
            for rep in self.journal.unreported(dev.id):
                if self._report_due.get(rep.id, 0.0) > now:
                    break  # in order: a later report never overtakes an earlier one
                if await self._deliver(rep) == "failed":
                    break
        except sqlite3.Error as exc:  # the gateway's own disk: the reports stay where they are
            log.error("device=%s pending final reports: journal error: %s", dev.id, exc)

    def _adopt_unreported(self, dev: DeviceConfig) -> None:
        entry = self.journal.get(dev.id)
        if entry.unreported is None or entry.outcome is None:
            return
        if dev.group is not None:
            rec = self.journal.group(dev.group)
            if rec is not None and dev.id in rec.members and rec.phase not in ("done", "failed",
                                                                              "staged"):
                return  # the group's decision is still open: its run reports every member
        try:
            data = json.loads(entry.unreported)
            result, detail = int(data["result"]), str(data["detail"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("device=%s journaled outcome unreadable (%s): %r dropped", dev.id, exc,
                      entry.unreported)
            self.journal.put(entry.with_(unreported=None), f"unreadable outcome dropped: {exc}")
            return
        handle = self.journal.report_handle(dev.id)
        if handle is None or handle.get("artifact_id") != entry.artifact_id:
            handle = self.offer_from_journal(dev).report_handle()
        log.info("device=%s queueing the final report of an earlier run: %s", dev.id, detail)
        self.journal.queue_report(dev.id, handle, result, detail)

    async def _deliver(self, rep: FinalReport) -> str:
        """One try at one journaled final report: ``delivered``, ``refused`` or ``failed``."""
        lock = self._report_locks.setdefault(rep.device_id, asyncio.Lock())
        async with lock:
            cur = self.journal.report(rep.id)
            if cur is None or cur.state != "pending":  # delivered meanwhile
                return cur.state if cur is not None else "refused"
            try:
                offer = Offer.from_handle(cur.handle)
                result = UpdateResult(cur.result)
                if offer.source != self.source.name:
                    raise ReportRefused(f"journaled for source {offer.source!r}; the gateway now "
                                        f"reports to {self.source.name!r}")
                self.journal.report_offered(cur.id)  # the server may hold it from here on
                await self.source.report(offer, Report(
                    UpdateState.IDLE, result, 1.0 if result == UpdateResult.SUCCESS else None,
                    cur.detail, report_id=f"{self.cfg.gateway_id}:{cur.id}"))
            except (ReportRefused, ValueError) as exc:
                self.journal.report_refused(cur.id, str(exc))
                self._report_due.pop(cur.id, None)
                self.metrics.inc("source_errors_total", source=self.source.name, op="final-report")
                log.warning("device=%s final report=%d refused for good: %s (kept in the journal, "
                            "not retried)", cur.device_id, cur.id, exc)
                return "refused"
            except Exception as exc:  # ReportNotDelivered, or a backend bug: keep it, retry later
                after = self.journal.report_failed(cur.id, f"{type(exc).__name__}: {exc}")
                n = after.attempts if after is not None else cur.attempts + 1
                delay = backoff_delay(n, self.cfg.retry.base_s, self.cfg.retry.max_s,
                                      self._report_rng)
                self._report_due[cur.id] = self.clock() + delay
                self.metrics.inc("source_errors_total", source=self.source.name, op="final-report")
                log.log(logging.WARNING if isinstance(exc, ReportNotDelivered) else logging.ERROR,
                        "device=%s final report=%d result=%s not delivered (try %d): %s; retrying "
                        "in %.0fs", cur.device_id, cur.id, cur.result, n, exc, delay,
                        exc_info=not isinstance(exc, ReportNotDelivered))
                return "failed"
            self.journal.report_delivered(cur.id)
            self._report_due.pop(cur.id, None)
            log.info("device=%s final report=%d delivered to %s result=%s", cur.device_id, cur.id,
                     self.source.name, result.name)
            return "delivered"

    def _describe_metrics(self) -> None:
        m = self.metrics
        m.describe("updates_started_total", "counter", "updates started (device attempts)")
        m.describe("updates_finished_total", "counter",
                   "updates finished, by status (updated/rolled-back/refused/failed) and reason")
        m.describe("upload_bytes_total", "counter", "image bytes sent to devices")
        m.describe("upload_seconds_total", "counter",
                   "seconds spent uploading (throughput = rate(bytes)/rate(seconds))")
        m.describe("upload_throughput_bytes_per_second", "gauge", "last upload's throughput")
        m.describe("source_errors_total", "counter", "fleet-server errors by operation")
        m.describe("retries_total", "counter", "attempts scheduled after a failure")
        m.describe("group_failures_total", "counter", "group updates that failed (all reverted)")
        m.describe("devices", "gauge", "devices by journal step")
        m.describe("sessions_active", "gauge", "device sessions open now")
        m.describe("sessions_peak", "gauge", "most device sessions open at once")
        m.describe("devices_parked", "gauge", "devices parked after retry.max_attempts failures")
        m.describe("source_up", "gauge", "1: the fleet server answers; 0: it is backed off")
        m.describe("source_failures", "gauge", "failed probes of the fleet server in a row")

        def live() -> list[tuple[str, dict[str, str], float]]:
            counts: dict[str, int] = {}
            for d in self.cfg.devices:
                s = self.steps.get(d.id, "idle")
                counts[s] = counts.get(s, 0) + 1
            rows: list[tuple[str, dict[str, str], float]] = [
                ("devices", {"step": s}, float(n)) for s, n in counts.items()]
            rows.append(("sessions_active", {}, float(self.sessions_active)))
            rows.append(("sessions_peak", {}, float(self.sessions_peak)))
            rows.append(("devices_parked", {}, float(sum(
                1 for v in self.retry_state.values() if v.get("parked")))))
            h = self.source_health
            rows.append(("source_up", {"source": h.name}, 0.0 if h.down else 1.0))
            rows.append(("source_failures", {"source": h.name}, float(h.failures)))
            return rows

        m.collector(live)

    def status_line(self) -> str:
        n = len(self.cfg.devices)
        by: dict[str, int] = {}
        for o in self.last.values():
            by[o.status.value] = by.get(o.status.value, 0) + 1
        busy = sum(1 for d in self.cfg.devices
                   if self.steps.get(d.id) not in (None, "idle", "done", "failed", "rolled-back",
                                                   "refused"))
        parts = [f"devices={n}", f"sessions={self.sessions_active}", f"updating={busy}"]
        parts += [f"{k}={v}" for k, v in sorted(by.items())]
        parked = sum(1 for v in self.retry_state.values() if v.get("parked"))
        if parked:
            parts.append(f"parked={parked}")
        if self.source_health.down:  # changes with the state only, not at every poll
            parts.append(f"source={self.source.name}:backing-off")
        return " ".join(parts)

    # -- passes ------------------------------------------------------------------------------
    async def run_once(self) -> Pass:
        t0 = time.monotonic()
        result = Pass()
        await self.source.start()
        try:
            await self.fleet.discover_once()  # device_templates: find the devices first
            outs = await asyncio.gather(*(self.attempt(k, d) for k, d in self.units()))
        finally:
            await self.source.close()
        for group in outs:
            for o in group:
                result.outcomes[o.device_id] = o
        result.seconds = time.monotonic() - t0
        return result

    async def _supervise(self, key: str, devs: list[DeviceConfig]) -> None:
        r = self.cfg.retry
        rng = random.Random()
        failures = 0
        while not self.stop.is_set():
            devs = dict(self.units()).get(key, devs)  # a discovered device may have moved
            outs = await self.attempt(key, devs)
            if self.stop.is_set():
                break
            if any(d.id in self.source_waiting for d in devs):
                # the fleet server is down: its backoff, not the device's; the unit is woken
                # as soon as a probe gets an answer (failures and park stay as they are)
                delay = self.source_health.wait_s()
            elif any(o.status == Status.FAILED for o in outs):
                failures += 1
                reason = next(o.detail for o in outs if o.status == Status.FAILED)[:300]
                if failures >= r.max_attempts:
                    delay = r.park_s
                    log.warning("unit=%s parked after=%d failures retry_in=%.0fs", key, failures, delay)
                    self._set_retry(devs, {"failures": failures, "parked": True,
                                           "until": time.time() + delay, "reason": reason})
                    failures = 0
                else:
                    delay = backoff_delay(failures, r.base_s, r.max_s, rng)
                    self.metrics.inc("retries_total")
                    log.info("unit=%s retry=%d in=%.1fs", key, failures, delay)
                    self._set_retry(devs, {"failures": failures, "parked": False,
                                           "until": time.time() + delay, "reason": reason})
            else:
                failures = 0
                self._set_retry(devs, None)
                delay = self.source.poll_interval()
                if any(o.status == Status.HELD for o in outs):  # waits for a window to open
                    delay = self.fleet.next_wake_s(devs, delay)
            await self.fleet.sleep(key, delay)  # or sooner: ctl, discovery, rollout, stop

    async def run_forever(self, stop: asyncio.Event) -> None:
        """The daemon: supervisors for every unit until ``stop``; then a bounded shutdown."""
        loop = asyncio.get_running_loop()
        t_stop_budget = self.cfg.stop_timeout_s
        aux: list[asyncio.Task[None]] = []
        if self.cfg.metrics is not None:  # first: a port in use is one line (exit 2), nothing ran
            self.metrics_server = MetricsServer(self.metrics, self.cfg.metrics.host,
                                                self.cfg.metrics.port,
                                                self.cfg.config_path or "<config>")
            await self.metrics_server.start()
        try:
            await self.source.start()
        except BaseException:
            if self.metrics_server is not None:
                await self.metrics_server.close()
            raise
        try:
            self.fleet.ops.clear_retry()  # a new process: nobody parked yet
            self._source_changed(self.source_health)
            sups = {key: asyncio.create_task(self._supervise(key, devs), name=f"unit-{key}")
                    for key, devs in self.units()}
            await self.fleet.start(lambda key, devs: None if key in sups else sups.setdefault(
                key, asyncio.create_task(self._supervise(key, devs), name=f"unit-{key}")))
            log.info("gateway=%s started devices=%d units=%d max_concurrent=%d", self.cfg.gateway_id,
                     len(self.cfg.devices), len(sups), self.cfg.max_concurrent)
            self.notifier.ready(self.status_line())
            wd = watchdog_interval()
            if wd:
                aux.append(asyncio.create_task(watchdog_loop(self.notifier, wd, self.status_line)))
            aux.append(asyncio.create_task(self._status_loop()))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([stopper, *sups.values()], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            dead = {k: t for k, t in sups.items() if t.done()} if not stop.is_set() else {}
            for key, t in dead.items():
                exc = None if t.cancelled() else t.exception()
                log.critical("unit=%s supervisor ended while the gateway runs: %s; stopping the "
                             "gateway with a failure", key, repr(exc) if exc else "returned",
                             exc_info=exc)
            t0 = loop.time()
            self.stop.set()
            self.notifier.stopping(f"stopping: {self.status_line()}")
            log.info("gateway stopping in_session=%d budget=%.0fs", len(self.in_session), t_stop_budget)
            await self._shutdown(sups, t0 + max(1.0, t_stop_budget - 3.0))
            if dead:
                raise SupervisorDied(f"supervisor of {', '.join(dead)} died: "
                                     + "; ".join(repr(t.exception()) for t in dead.values()
                                                 if not t.cancelled() and t.exception()))
        finally:
            await self.fleet.close_async()
            for t in aux:
                t.cancel()
            for t in aux:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if self.metrics_server is not None:
                await self.metrics_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.source.close(), 2.0)
            log.info("gateway stopped")

    async def _shutdown(self, sups: dict[str, asyncio.Task[None]], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        devs = dict(self.units())

        def interruptible(key: str) -> bool:
            # not in a session (waiting for a slot / backoff) or uploading: stop it now; the
            # upload is checkpointed and resumes from the device's offset at the next start
            in_sess = [d.id for d in devs[key] if d.id in self.in_session]
            return not in_sess or all(self.steps.get(i) in (Step.UPLOAD.value, Step.READ_STATE.value)
                                      for i in in_sess)

        pending = {t for t in sups.values() if not t.done()}
        while pending and loop.time() < deadline:
            for key, t in sups.items():
                if t in pending and interruptible(key):
                    t.cancel()
            _done, pending = await asyncio.wait(pending, timeout=min(0.2, deadline - loop.time()))
        for t in pending:
            t.cancel()
        for t in sups.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _status_loop(self) -> None:
        last = ""
        while True:
            s = self.status_line()
            if s != last:
                self.notifier.status(s)
                last = s
            await asyncio.sleep(2.0)


async def run_daemon(cfg: GatewayConfig, stop: asyncio.Event,
                     started: Callable[[Gateway], Awaitable[None]] | None = None) -> Gateway:
    """Build and run a Gateway until ``stop`` (for the CLI and embedding)."""
    gw = Gateway(cfg)
    try:
        if started is not None:
            await started(gw)
        await gw.run_forever(stop)
    finally:
        gw.close()
    return gw
