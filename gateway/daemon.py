"""The gateway process: fleet source -> image store -> per-device engines, under limits.

Owns the passes over all devices: for each device (concurrently, under a global cap and one
session at a time per serial port) read its state, ask the source for its target, fetch and
verify the artifact, run the update engine, and report progress and outcome back to the
source. ``run_once`` is one pass (``--once``); ``run_forever`` repeats at the source's
polling interval until stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import BleTransport, DeviceConfig, GatewayConfig, SerialTransport, UdpTransport
from gateway.engine import Outcome, Slots, Status, Step, UpdateEngine
from gateway.images import ImageRefused, ImageStore
from gateway.journal import Journal
from gateway.mcuboot import TrustedKey, Version
from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import SerialTransport as SerialLink
from gateway.smp.transport import Transport, TransportError
from gateway.smp.transport import UdpTransport as UdpLink
from gateway.sources import build_source
from gateway.sources.base import (
    DeviceView,
    FetchError,
    FleetSource,
    Offer,
    Report,
    UpdateResult,
    UpdateState,
)

log = logging.getLogger("gateway")

ProgressFn = Callable[[str, str, int, int], None]


def make_transport(dev: DeviceConfig) -> Transport:
    t = dev.transport
    if isinstance(t, UdpTransport):
        return UdpLink(t.host, t.port, t.mtu)
    if isinstance(t, SerialTransport):
        return SerialLink(t.port, t.baud, t.line_length, t.mtu)
    if isinstance(t, BleTransport):
        from gateway.smp.ble import BleLink  # type: ignore[import-not-found,unused-ignore]

        return BleLink(t)  # type: ignore[no-any-return,unused-ignore]
    raise ValueError(f"unsupported transport {t!r}")


@dataclass
class Pass:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes.values())


class Gateway:
    def __init__(self, cfg: GatewayConfig, *, source: FleetSource | None = None,
                 on_progress: ProgressFn | None = None) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = [TrustedKey.load(p) for p in cfg.trusted_keys]
        self.store = ImageStore(cfg.state_dir / "images", keys)
        self.journal = Journal(cfg.state_dir / "journal.sqlite")
        self.source = source or build_source(cfg)
        self.on_progress = on_progress
        self._sem = asyncio.Semaphore(cfg.max_concurrent)
        self._port_locks: dict[str, asyncio.Lock] = {}
        self._last_progress_report: dict[str, float] = {}

    def close(self) -> None:
        self.journal.close()

    def _port_lock(self, dev: DeviceConfig) -> asyncio.Lock | None:
        if isinstance(dev.transport, SerialTransport):
            return self._port_locks.setdefault(dev.transport.port, asyncio.Lock())
        return None

    async def run_once(self) -> Pass:
        t0 = time.monotonic()
        result = Pass()
        await self.source.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = {d.id: tg.create_task(self.update_device(d)) for d in self.cfg.devices}
        finally:
            await self.source.close()
        for dev_id, task in tasks.items():
            result.outcomes[dev_id] = task.result()
        result.seconds = time.monotonic() - t0
        return result

    async def run_forever(self, stop: asyncio.Event) -> None:
        await self.source.start()
        try:
            while not stop.is_set():
                async with asyncio.TaskGroup() as tg:
                    for d in self.cfg.devices:
                        tg.create_task(self.update_device(d))
                try:
                    await asyncio.wait_for(stop.wait(), self.source.poll_interval())
                except TimeoutError:
                    pass
        finally:
            await self.source.close()

    async def update_device(self, dev: DeviceConfig) -> Outcome:
        """One device, one pass. Never raises: every problem becomes an Outcome."""
        lock = self._port_lock(dev)
        async with self._sem:
            if lock is not None:
                async with lock:
                    return await self._update_device(dev)
            return await self._update_device(dev)

    async def _update_device(self, dev: DeviceConfig) -> Outcome:
        session = SMPSession(make_transport(dev), device_id=dev.id, timeout_s=dev.timeouts.request_s)
        offer: Offer | None = None
        try:
            await asyncio.wait_for(session.open(), dev.timeouts.connect_s)
        except (TransportError, TimeoutError) as exc:
            return self._fail(dev, UpdateResult.CONNECTION_LOST, f"cannot open link: {exc}")
        try:
            await session.mcumgr_params(timeout_s=min(2.0, dev.timeouts.request_s))
            engine = UpdateEngine(dev, session, self.journal, on_progress=self._progress_cb(dev))
            slots = await engine.read_slots()
            offer, resume_path = await self._target(dev, slots)
            if offer is None and slots.active is not None and not slots.active.confirmed:
                # e.g. someone else's test boot: it is not settled, and not ours to confirm
                return self._fail(dev, UpdateResult.UPDATE_FAILED,
                                  f"device is test-running unconfirmed {slots.active.version}, which "
                                  "this gateway did not test; refusing to confirm it")
            if offer is None:
                entry = engine.entry.with_(step=Step.DONE.value)
                self.journal.put(entry, "up to date")
                v = slots.active.version if slots.active else None
                log.info("device=%s up-to-date version=%s", dev.id, v)
                return Outcome(dev.id, Status.UP_TO_DATE, UpdateResult.SUCCESS, f"running {v}",
                               old_version=v, new_version=v)
            path = resume_path
            if path is None:
                await self._report(offer, Report(UpdateState.DOWNLOADING))
                try:
                    path = await self.source.fetch(offer, dev.slot_size)
                except FetchError as exc:
                    return await self._final(offer, self._fail(dev, exc.result, f"download: {exc}"))
                await self._report(offer, Report(UpdateState.DOWNLOADED))
            try:
                image = self.store.add_file(path, hardware=offer.hardware,
                                            allow_unsigned=dev.allow_unsigned)
            except ImageRefused as exc:
                out = Outcome(dev.id, Status.REFUSED, exc.reason.lwm2m, str(exc),
                              old_version=slots.active.version if slots.active else None,
                              new_version=str(offer.version) if offer.version else None)
                log.warning("device=%s refused reason=%s %s", dev.id, exc.reason.value, exc.message)
                self.journal.put(engine.entry.with_(step=Step.REFUSED.value, outcome="refused",
                                                    last_error=str(exc)), str(exc))
                return await self._final(offer, out)
            await self._report(offer, Report(UpdateState.UPDATING, progress=0.0))
            out = await engine.run(image, slots, artifact_id=offer.artifact_id, source=offer.source)
            return await self._final(offer, out)
        except (SMPTimeout, TransportError) as exc:
            out = self._fail(dev, UpdateResult.CONNECTION_LOST, f"{type(exc).__name__}: {exc}")
            return await self._final(offer, out) if offer else out
        except SMPError as exc:
            out = self._fail(dev, UpdateResult.UPDATE_FAILED, str(exc))
            return await self._final(offer, out) if offer else out
        finally:
            await session.close()

    async def _target(self, dev: DeviceConfig, slots: Slots) -> tuple[Offer | None, Path | None]:
        """The journal's unfinished update wins over the source (resume after a crash)."""
        entry = self.journal.get(dev.id)
        if (entry.outcome is None and entry.target_hash and entry.image_path
                and Path(entry.image_path).is_file()):
            log.info("device=%s resuming step=%s target=%s", dev.id, entry.step, entry.target_version)
            offer = Offer(device_id=dev.id, source=entry.source or self.source.name,
                          artifact_id=entry.artifact_id or entry.target_hash,
                          version=Version.parse(entry.target_version) if entry.target_version else None,
                          hardware=None)
            return offer, Path(entry.image_path)
        view = DeviceView(id=dev.id, hardware=dev.hardware, running_version=slots.active_version,
                          running_hash=slots.active_hash, group=dev.group)
        return await self.source.check(view), None

    def _fail(self, dev: DeviceConfig, result: UpdateResult, detail: str) -> Outcome:
        log.error("device=%s failed result=%s %s", dev.id, result.name, detail)
        entry = self.journal.get(dev.id)
        self.journal.put(entry.with_(last_error=detail), detail)
        return Outcome(dev.id, Status.FAILED, result, detail)

    def _progress_cb(self, dev: DeviceConfig) -> Callable[[str, Step, int, int], None]:
        def cb(device_id: str, step: Step, off: int, total: int) -> None:
            if self.on_progress:
                self.on_progress(device_id, step.value, off, total)
        return cb

    async def _report(self, offer: Offer, report: Report) -> None:
        try:
            await self.source.report(offer, report)
        except Exception as exc:  # a report that fails must not fail the update
            log.warning("device=%s report to %s failed: %s", offer.device_id, self.source.name, exc)

    async def _final(self, offer: Offer | None, out: Outcome) -> Outcome:
        if offer is not None:
            state = UpdateState.IDLE
            await self._report(offer, Report(state, out.result, 1.0 if out.ok else None,
                                             f"{out.status.value}: {out.detail}"))
        return out
