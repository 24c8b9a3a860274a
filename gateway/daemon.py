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

This module only schedules: what one device's attempt does - the offer, the plan, the engine,
blocking, the final reports - is in ``gateway.run`` (one module per step), whose mixins
``Gateway`` is built from; the names that moved there are re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from gateway.config import (
    BleTransport,
    ConfigError,
    DeviceConfig,
    GatewayConfig,
    SerialTransport,
    UdpTransport,
)
from gateway.engine import Outcome, Status, Step, UpdateEngine
from gateway.fleetops import FleetOps  # discovery, rollout, windows, cancel, ctl
from gateway.groups import GroupRunner
from gateway.images import ImageStore
from gateway.journal import Journal
from gateway.mcuboot import TrustedKey
from gateway.metrics import Metrics, MetricsServer
from gateway.plan import Stopping
from gateway.run import DeviceStep, ProgressFn, SourceBackingOff, backoff_delay
from gateway.smp.ble import BleLink, adapter_key  # the BLE stacks themselves load lazily
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport as SerialLink
from gateway.smp.transport import Transport, TransportError
from gateway.smp.transport import UdpTransport as UdpLink
from gateway.sources import build_source
from gateway.sources.base import (
    FleetSource,
    SourceHealth,
    UpdateResult,
)
from gateway.statelock import StateDirLock
from gateway.systemd import Notifier, watchdog_interval, watchdog_loop

log = logging.getLogger("gateway")

# what ``from gateway.daemon import ...`` gives (the steps' names re-exported from gateway.run)
__all__ = [
    "Gateway",
    "Pass",
    "ProgressFn",
    "SourceBackingOff",
    "SupervisorDied",
    "backoff_delay",
    "device_address",
    "make_transport",
    "run_daemon",
]


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


class Gateway(DeviceStep):
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
