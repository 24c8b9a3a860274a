"""One simulated device: transports, link emulation, request queue, MCUboot, app knobs.

Owns a device's life cycle (boot through ``boot.run_bootloader``, reset, crash, power cycle),
its SMP request queue (Zephyr 3.4 ``subsys/mgmt/mcumgr/transport/src/smp.c``: one SMP work
queue, one shared netbuf pool) with the device time each request takes, and the UDP and PTY
endpoints (``smp_udp.c``; ``uart_mcumgr.c``/``smp_uart.c`` or ``smp_shell.c`` through
``serial_rx.LineRx`` and ``serial_util.c``'s frame decoding). The BLE endpoint is in
``ble.py``; endpoints and device meet through ``endpoint.py``'s protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import struct
import tty
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smp import packet as smppacket
from smp.exceptions import SMPBadContinueDelimiter, SMPBadCRC, SMPBadStartDelimiter

from gateway.mcuboot import ImageInfo, TrustedKey, Version
from gateway.sim.ble import BleEndpoint  # imports bumble: only when used
from gateway.sim.boot import (
    BootEnv,
    BootResult,
    SwapType,
    Validator,
    run_bootloader,
    write_img_confirmed,
)
from gateway.sim.config import SerialTransportConfig, SimDeviceConfig
from gateway.sim.endpoint import Endpoint
from gateway.sim.faults import Faults, PowerCut
from gateway.sim.flash import Flash, Trailer
from gateway.sim.image_format import EncryptionKey
from gateway.sim.img_state import ImgMgmt
from gateway.sim.link import Pipe
from gateway.sim.recovery import RecoveryServer
from gateway.sim.serial_rx import LineRx
from gateway.sim.smp_server import HandleResult, SmpServer

logger = logging.getLogger("gateway.sim")

# "recovery": MCUboot's serial recovery holds the UART; "dfu-window": MCUboot listens for a
# recovery frame before booting (CONFIG_BOOT_SERIAL_WAIT_FOR_DFU)
DeviceState = Literal["off", "rebooting", "running", "hung", "halted", "recovery", "dfu-window"]
Reply = Callable[[bytes], None]


class _DeviceLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("device", self.extra["device"] if self.extra else "?")
        kwargs["extra"] = extra
        return f"[{extra['device']}] {msg}", kwargs


@dataclass(frozen=True)
class SimEvent:
    """One thing that happened to a device (``t`` is the event loop's clock)."""

    t: float
    kind: str  # boot, reset, upload-start, upload-done, upload-resume, state-write, ...
    detail: dict[str, Any] = field(default_factory=dict)


class SimDevice:
    """A Zephyr smp_svr + MCUboot device. Create through :class:`Simulator`."""

    def __init__(self, cfg: SimDeviceConfig, state_dir: Path) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.log = _DeviceLog(logger, {"device": cfg.id})
        self.flash = Flash(state_dir / cfg.id / "flash", cfg.slot_sizes,
                           write_align=cfg.boot_write_align,
                           max_img_sectors=cfg.boot_max_img_sectors)
        keys = [TrustedKey.load(cfg.key)] if cfg.key is not None else None
        enc = EncryptionKey.load(cfg.encryption_key) if cfg.encryption_key is not None else None
        self.validator = Validator(keys, hash_algorithm=cfg.hash_algorithm, enc=enc)
        self.faults = Faults(cfg)
        self.running_slot = 0  # the slot MCUboot booted image 0 from (direct-XIP: 0 or 1)
        self.last_boot: BootResult | None = None
        self.recovery_pin = cfg.recovery_pin
        self.boot_mode_request: int | None = None  # retention boot mode (survives a warm reset)
        self.img = ImgMgmt(cfg, self.flash, lambda: self.running_slot)
        self.server = SmpServer(cfg, self.flash, img=self.img, on_upload=self._on_upload,
                                on_event=self._event)
        self.server.on_trailer_write = functools.partial(self.faults.trailer_write, self.flash)
        self.recovery = RecoveryServer(cfg, self.flash, self.validator, self.img,
                                       on_event=self._event)
        self._dfu_frame: asyncio.Event | None = None
        self.events: list[SimEvent] = []
        self.counters: Counter[str] = Counter()
        self.state: DeviceState = "off"
        self.udp_sources: set[tuple[str, int]] = set()
        self._last_source: tuple[str, int] | None = None
        seed = cfg.link.seed if cfg.link.seed is not None else zlib.crc32(cfg.id.encode())
        self.rng = random.Random(seed)
        bw = cfg.link.bandwidth_bps
        req_bw = rsp_bw = bw
        if cfg.serial is not None:
            if cfg.serial.baud:
                req_bw = rsp_bw = min(bw or float("inf"), cfg.serial.baud / 10)
            if cfg.serial.rx_bytes_per_s:
                req_bw = min(req_bw or float("inf"), cfg.serial.rx_bytes_per_s)
            if cfg.serial.tx_bytes_per_s:
                rsp_bw = min(rsp_bw or float("inf"), cfg.serial.tx_bytes_per_s)
        lk = cfg.link
        self.req_pipe = Pipe(latency=lk.req_latency, bandwidth=req_bw, loss=lk.request_loss,
                             duplicate=lk.duplicate, reorder=lk.reorder,
                             reorder_delay=lk.reorder_delay_s, rng=self.rng)
        self.rsp_pipe = Pipe(latency=lk.rsp_latency, bandwidth=rsp_bw, loss=lk.response_loss,
                             duplicate=lk.duplicate, reorder=lk.reorder,
                             reorder_delay=lk.reorder_delay_s, rng=self.rng)
        self._queue: deque[tuple[bytes, Reply, float]] = deque()
        self._vfree = 0.0  # device time at which the SMP handler is free again
        self._busy = False
        # windows in which the CPU is halted by flash erase/programming (flash_stalls_cpu)
        self.stalls: list[tuple[float, float]] = []
        self._generation = 0  # bumped at every reset: work of the previous life is void
        self._wake: asyncio.Event | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._app_timers: list[asyncio.TimerHandle] = []
        self._waiters: list[tuple[Callable[[SimDevice], bool], asyncio.Future[None]]] = []
        self._upload_reboot_done = False
        self._reboot_task: asyncio.Task[None] | None = None
        self.transport: Endpoint
        if cfg.udp is not None:
            self.transport = UdpEndpoint(self, cfg.udp.host, cfg.udp.port)
        elif cfg.ble is not None:
            self.transport = BleEndpoint(self, cfg.ble)
        else:
            self.transport = PtyEndpoint(self)

    # --- public API -----------------------------------------------------------------
    @property
    def address(self) -> str:
        """UDP ``host:port`` or the serial port path (the stable link if configured)."""
        return self.transport.address

    def endpoint(self) -> dict[str, Any]:
        return {"transport": self.transport.kind, "address": self.address,
                **self.transport.describe()}

    @property
    def boots(self) -> int:
        return self.counters["boots"]

    @property
    def boot_outcomes(self) -> list[str]:
        return [e.detail["outcome"] for e in self.events if e.kind == "boot"]

    def slot_bytes(self, slot: int) -> bytes:
        """The raw slot contents (slot_size bytes)."""
        return self.flash.read(slot)

    def image_info(self, slot: int) -> ImageInfo | None:
        return self.flash.image_info(slot)

    def trailer(self, slot: int) -> Trailer:
        """MCUboot's trailer fields of ``slot``, read from the slot's last bytes."""
        return self.flash.trailer(slot)

    def image_states(self) -> list[dict[str, Any]]:
        """What an image state read would answer now (as dicts)."""
        return [s.model_dump(exclude_none=True) for s in self.server.state_images()]

    async def wait_for(
        self, predicate: Callable[[SimDevice], bool], timeout_s: float = 10.0
    ) -> None:
        """Wait until ``predicate(device)`` holds (checked at every event/counter change)."""
        if predicate(self):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout_s)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def wait_booted(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until the device has booted ``n`` times in total and is up (or stuck)."""
        await self.wait_for(
            lambda d: d.boots >= n and d.state in ("running", "hung", "halted", "recovery"),
            timeout_s)

    async def power_cycle(self, wait: bool = True, *, recovery_pin: bool | None = None) -> None:
        """Cut power and restore it: works in any state, boots after ``boot_time_s``.

        ``recovery_pin``: hold (True) or release (False) the recovery button across the power
        cycle (as a gateway GPIO wired to it would); None leaves it as it is.
        """
        if recovery_pin is not None:
            self.recovery_pin = recovery_pin
        target = self.boots + 1
        self.boot_mode_request = None  # retention RAM does not survive a power cut
        self._start_reboot("power-cycle", force=True)
        if wait:
            await self.wait_booted(target, timeout_s=self.cfg.boot_time_s + 30)

    def set_recovery_pin(self, held: bool) -> None:
        """Press or release the serial-recovery / firmware-loader button (read at reset)."""
        self.recovery_pin = held

    @property
    def in_recovery(self) -> bool:
        """MCUboot's serial recovery holds the UART."""
        return self.state == "recovery"

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._worker_task = asyncio.create_task(self._worker(), name=f"sim-{self.id}-worker")
        if self.flash.is_blank():
            # a padded image keeps its own trailer; a plain one gets magic + image_ok as
            # `imgtool sign --pad --confirm` would write them
            if self.cfg.initial_image is not None:
                self.flash.provision(self.cfg.initial_image.read_bytes())
                self._event("provisioned", {"image": str(self.cfg.initial_image)})
            for n, extra in enumerate(self.cfg.extra_images, start=1):
                if extra.initial_image is not None:
                    self.flash.provision(extra.initial_image.read_bytes(), 2 * n)
                    self._event("provisioned", {"image": str(extra.initial_image), "index": n})
            if self.cfg.loader_image is not None and self.flash.has_slot(1):
                self.flash.provision(self.cfg.loader_image.read_bytes(), 1, confirm=False)
                self._event("provisioned", {"image": str(self.cfg.loader_image), "loader": True})
        await self.transport.open()
        await self._boot()

    async def stop(self) -> None:
        self._cancel_app_timers()
        for t in [self._worker_task, self._reboot_task, *self._tasks]:
            if t is not None and not t.done():
                t.cancel()
        for t in [self._worker_task, self._reboot_task, *self._tasks]:
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self.req_pipe.clear()
        self.rsp_pipe.clear()
        await self.transport.close()
        self.state = "off"
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()

    # --- events ---------------------------------------------------------------------
    def _event(self, kind: str, detail: dict[str, Any] | None = None) -> None:
        ev = SimEvent(asyncio.get_running_loop().time(), kind, dict(detail or {}))
        self.events.append(ev)
        self.log.info("%s %s", kind, ev.detail)
        self._notify()

    def _notify(self) -> None:
        for pred, fut in list(self._waiters):
            if not fut.done():
                try:
                    ok = pred(self)
                except Exception as exc:
                    fut.set_exception(exc)
                    continue
                if ok:
                    fut.set_result(None)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"sim-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- request path ---------------------------------------------------------------
    def accepting(self) -> bool:
        return self.state in ("running", "recovery", "dfu-window")

    def frame_arrived(self, frame: bytes, reply: Reply, *, limit_in_flight: bool,
                      netbuf_overhead: int = 0, at: float | None = None,
                      reserved: int = 0) -> None:
        """A complete SMP packet reached the device's SMP transport.

        Zephyr's transports put requests and responses in one pool of ``buf_count`` netbufs of
        ``buf_size`` bytes (smp.c ``pkt_pool``); the request being handled also holds its
        response buffer. A request that finds no free netbuf is dropped (smp_udp.c "Failed to
        allocate mcumgr buffer"). ``netbuf_overhead``: transport framing decoded into the same
        netbuf (serial: 2-byte length + CRC16, serial_util.c). ``reserved``: netbufs the
        transport itself holds (smp_bt's reassembly buffer, preset ``zephyr-ble``).
        """
        if not self.accepting():
            self.counters["ignored_not_running"] += 1
            self._notify()
            return
        if self.state in ("recovery", "dfu-window"):
            # MCUboot's boot_serial: one request at a time from its own line buffers, no
            # netbuf pool; a frame above CONFIG_BOOT_SERIAL_MAX_RECEIVE_SIZE is dropped
            if len(frame) + netbuf_overhead > self.recovery.max_receive:
                self.counters["dropped_oversize"] += 1
                self._notify()
                return
            if self.state == "dfu-window":
                self.state = "recovery"  # a frame in the window: MCUboot stays in recovery
                self._event("recovery", {"entered_by": "wait-for-dfu"})
                if self._dfu_frame is not None:
                    self._dfu_frame.set()
            self._queue.append((frame, reply,
                                asyncio.get_running_loop().time() if at is None else at))
            assert self._wake is not None
            self._wake.set()
            return
        if len(frame) + netbuf_overhead > self.cfg.buf_size:
            self.counters["dropped_oversize"] += 1  # does not fit a netbuf
            self._notify()
            return
        in_flight = len(self._queue) + (1 if self._busy else 0)
        held = len(self._queue) + (2 if self._busy else 0)  # request + response while busy
        if limit_in_flight and held + reserved >= self.cfg.buf_count:
            self.counters["dropped_netbuf"] += 1  # netbuf pool exhausted
            self._notify()
            return
        self._queue.append((frame, reply,
                            asyncio.get_running_loop().time() if at is None else at))
        self.counters["max_in_flight"] = max(self.counters["max_in_flight"], in_flight + 1)
        assert self._wake is not None
        self._wake.set()

    def send_response(self, rsp: bytes, deliver: Callable[[bytes], None]) -> None:
        """Through the response pipe (frame loss applies to the whole response)."""
        if self.cfg.link.response_loss and self.rng.random() < self.cfg.link.response_loss:
            self.counters["lost_responses"] += 1
            return
        self.rsp_pipe.send(len(rsp), lambda: deliver(rsp), lossy=False)

    async def _worker(self) -> None:
        assert self._wake is not None
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            frame, reply, at = self._queue.popleft()
            gen = self._generation
            self._busy = True
            self._notify()
            try:
                await self._process(frame, reply, gen, at)
            except Exception:
                self.log.exception("request handling failed")
            finally:
                self._busy = False
            if not self._queue:
                self.transport.smp_idle()

    def smp_busy(self) -> bool:
        """True while the SMP work queue has a request to handle."""
        return self._busy or bool(self._queue)

    async def _process(self, frame: bytes, reply: Reply, gen: int, at: float) -> None:
        if len(frame) >= 8:
            _, _, _, group, _, cmd = struct.unpack_from("!BBHHBB", frame)
            self.counters["requests"] += 1
            self.counters[f"requests.{group}.{cmd}"] += 1
            if group == 1 and cmd == 1:
                self.counters["upload_bytes_received"] += max(0, len(frame) - 8)
        if self.state == "recovery":
            await self._process_recovery(frame, reply, gen, at)
            return
        if len(frame) >= 8 and len(self._queue) + 1 >= self.cfg.buf_count:
            # smp_process_request_packet: smp_alloc_rsp finds no free netbuf (queued requests
            # hold them all): smp_on_err answers {"rc": MGMT_ERR_ENOMEM} in the request's own
            # buffer and the request is not handled.
            self.counters["enomem"] += 1
            op, _, _, group, seq, cmd = struct.unpack_from("!BBHHBB", frame)
            if (op & 7) in (0, 2):
                reply(self.faults.mutate(self.server._pack(
                    (op & 7, (op >> 3) & 3, group, seq, cmd), {"rc": 2})))
            self._notify()
            return
        res = self.server.handle(frame)
        # Device time: the handler's CPU time, then the flash erase/programming it did
        # (SmpServer accounts them per img_mgmt's erase and stream_flash's block writes).
        # The flash state changes at once; the answer leaves when the time is up.
        # Device time is counted from when the request arrived (or the handler became free),
        # not from when this task got the CPU, so a loaded host does not shift it.
        loop = asyncio.get_running_loop()
        cpu_s = self.cfg.request_processing_s
        vstart = max(at, self._vfree)
        vend = vstart + cpu_s + res.flash_s
        self._vfree = vend
        if res.flash_s and self.cfg.flash_stalls_cpu:
            self.stalls.append((vstart + cpu_s, vend))
            self.stalls = [w for w in self.stalls if w[1] > loop.time() - 5.0]
        wait = vend - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)  # a timer: other devices keep running
        else:
            await asyncio.sleep(0)  # one request at a time, but let the loop breathe
        if gen != self._generation:
            return
        if res.crash:
            if res.power_cut:
                self.boot_mode_request = None
                self._start_reboot("power cut", force=True)
            else:
                self._start_reboot("crash during upload")
            return
        for r in res.responses:
            reply(self.faults.mutate(r))
        self._notify()
        if res.reset:
            if res.boot_mode is not None:
                self.boot_mode_request = res.boot_mode
            loop = asyncio.get_running_loop()
            # CONFIG_MCUMGR_GRP_OS_RESET_MS later, but not before the answer has left
            down_at = max(loop.time() + self.cfg.reset_delay_s, self.rsp_pipe.busy_until)
            loop.call_at(down_at, self._reboot_of, gen, "reset command")

    async def _process_recovery(self, frame: bytes, reply: Reply, gen: int, at: float) -> None:
        """A request to MCUboot's serial recovery (``recovery.RecoveryServer``)."""
        self.counters["recovery_requests"] += 1
        res: HandleResult = self.recovery.handle(frame)
        loop = asyncio.get_running_loop()
        vend = max(at, self._vfree) + self.cfg.request_processing_s + res.flash_s
        self._vfree = vend
        wait = vend - loop.time()
        await asyncio.sleep(max(0.0, wait))
        if gen != self._generation:
            return
        for r in res.responses:
            reply(r)
        self._notify()
        if res.reset:
            # bs_reset: answer, 250 ms, sys_reboot
            down_at = max(loop.time() + 0.25, self.rsp_pipe.busy_until)
            loop.call_at(down_at, self._reboot_of, gen, "recovery reset")

    def _on_upload(self, old: int, new: int) -> bool:
        at = self.cfg.reboot_during_upload_at
        if at is not None and not self._upload_reboot_done and old <= at < new:
            self._upload_reboot_done = True
            self._event("crash", {"reason": "reboot_during_upload_at", "offset": new})
            return True
        if self.faults.unplug_at(old, new) and isinstance(self.transport, PtyEndpoint):
            self._event("unplug", {"offset": new, "for_s": self.cfg.unplug_for_s})
            self._spawn(self.transport.unplug(self.cfg.unplug_for_s), "unplug")
        return False

    # --- life cycle -----------------------------------------------------------------
    def _cancel_app_timers(self) -> None:
        for h in self._app_timers:
            h.cancel()
        self._app_timers.clear()

    def _reboot_of(self, gen: int, reason: str) -> None:
        """A reboot the device scheduled (os_mgmt's delayed work item, MCUboot's bs_reset) in
        life ``gen``: it dies with that life - a reboot in between (a crash, another reset
        already done) takes the pending work item with it, as the RAM it lives in."""
        if gen == self._generation:
            self._start_reboot(reason)

    def _start_reboot(self, reason: str, force: bool = False) -> None:
        if self._reboot_task is not None and not self._reboot_task.done():
            return
        if self.state == "off" and not force:
            return
        self._reboot_task = asyncio.create_task(self._reboot(reason), name=f"sim-{self.id}-reboot")

    async def _reboot(self, reason: str) -> None:
        self._generation += 1
        self.state = "rebooting"
        self._cancel_app_timers()
        self.server.reset_ram()  # g_img_mgmt_state lives in RAM
        self.recovery.reset_ram()
        self._queue.clear()
        self.req_pipe.clear()
        self.counters["resets"] += 1
        self._event("reset", {"reason": reason})
        await self.transport.link_down()
        if self.faults.dead_after(self.counters["resets"]):
            self.state = "off"  # never comes back on its own (power_cycle() revives it)
            self._event("dead", {"reset": self.counters["resets"]})
            return
        await asyncio.sleep(self.cfg.boot_time_s * self.cfg.time_scale)
        await self._boot()

    def boot_env(self, enter_loader: bool = False) -> BootEnv:
        """The MCUboot build facts of this device, for ``boot.run_bootloader``."""
        c = self.cfg
        return BootEnv(
            mode=c.mcuboot_mode, images=c.image_count,
            netcore=frozenset(i + 1 for i, x in enumerate(c.extra_images) if x.update == "netcore"),
            offsets=c.slot_offsets, swap_sector=c.swap_sector_size,
            erase_sector=c.flash_sector_size, write_align=max(1, c.boot_write_align),
            downgrade_prevention=c.downgrade_prevention, ram_load_region=c.ram_load_region,
            enter_loader=enter_loader, on_step=self.faults.swap_step)

    async def _boot(self) -> None:
        """MCUboot's ``main``: serial recovery entry checks, the wait-for-DFU window,
        ``boot_go`` (``boot.run_bootloader``), then the application or no-application
        recovery."""
        sr = self.cfg.serial_recovery
        boot_mode = self.boot_mode_request
        self.boot_mode_request = None  # MCUboot clears the retention boot mode it read
        entry = "pin" if self.recovery_pin else (
            "boot_mode" if boot_mode == 1 else None)
        if self.cfg.mcuboot_mode != "firmware-loader" and sr is not None and entry is not None \
                and (entry == "pin" or sr.boot_mode):
            await self._enter_recovery(entry)
            return
        if sr is not None and sr.wait_for_dfu_ms is not None:
            # boot_serial_check_start: listen on the UART for the window before boot_go
            self._dfu_frame = asyncio.Event()
            self.state = "dfu-window"
            await self.transport.link_up()
            self._event("dfu-window", {"ms": sr.wait_for_dfu_ms})
            try:
                await asyncio.wait_for(self._dfu_frame.wait(),
                                       sr.wait_for_dfu_ms / 1000 * self.cfg.time_scale)
            except TimeoutError:
                pass
            self._dfu_frame = None
            if self.state == "recovery":
                self.counters["boots"] += 1
                self._event("boot", {"outcome": "serial recovery", "n": self.counters["boots"],
                                     "entered_by": "wait-for-dfu"})
                return
            self.state = "rebooting"
        env = self.boot_env(enter_loader=self.cfg.mcuboot_mode == "firmware-loader"
                            and entry is not None)
        try:
            result: BootResult = await asyncio.to_thread(
                run_bootloader, self.flash, self.validator, env)
        except PowerCut as cut:
            self.state = "off"
            await self.transport.link_down()
            self._event("power-cut", {"during": "swap", "detail": str(cut)})
            await asyncio.sleep(self.cfg.boot_time_s * self.cfg.time_scale)
            await self._boot()  # power is back: MCUboot resumes the swap / copy
            return
        if any(t != SwapType.NONE for t in result.performed):
            # MCUboot's swap / copy takes real time before the image starts (swap_seconds)
            await asyncio.sleep(self.swap_seconds() * self.cfg.time_scale)
        self.running_slot = result.active_slots[0] if result.active_slots else 0
        self.last_boot = result
        if not result.booted and sr is not None and sr.no_application:
            self._event("mcuboot", {"log": list(result.log)})
            await self._enter_recovery("no-application", outcome=result.outcome)
            return
        self.counters["boots"] += 1
        info = self.flash.image_info(self.running_slot) if result.booted else None
        detail: dict[str, Any] = {"outcome": result.outcome, "n": self.counters["boots"],
                                  "slot": self.running_slot, "log": list(result.log)}
        if info is not None:
            detail.update(version=info.version.smp_str(), hash=info.hash.hex(),
                          permanent=result.permanent)
        if len(result.performed) > 1:
            detail["performed"] = [t.name.lower() for t in result.performed]
        if not result.booted or info is None:
            self.state = "halted"
            await self.transport.link_down()
            self._event("boot", detail)
            return
        version = info.version
        dead = self.cfg.app_smp_dead and not result.loader
        if dead or any(_same_version(v, version) for v in self.cfg.hang_on_boot_versions):
            self.state = "hung"
            await self.transport.link_up()
            self._event("boot", detail)
            self._event("hang", {"version": version.smp_str(), "smp_dead": dead})
            if self.cfg.hang_watchdog_s is not None and not dead:
                self._app_timers.append(asyncio.get_running_loop().call_later(
                    self.cfg.hang_watchdog_s, self._watchdog, version.smp_str()))
            return
        self.state = "running"
        await self.transport.link_up()
        self._event("boot", detail)
        loop = asyncio.get_running_loop()
        if any(_same_version(v, version) for v in self.cfg.crash_on_boot_versions):
            self._app_timers.append(loop.call_later(
                self.cfg.crash_after_s, self._watchdog, version.smp_str()))
        elif self.cfg.app_confirms_after_s is not None:
            t = self.flash.trailer(self.running_slot)
            if t.magic == "good" and not t.image_ok:
                self._app_timers.append(loop.call_later(
                    self.cfg.app_confirms_after_s, self._app_confirm))

    async def _enter_recovery(self, entered_by: str, outcome: str | None = None) -> None:
        """``boot_serial_enter``: MCUboot serves SMP on the UART until reset."""
        self.counters["boots"] += 1
        self.state = "recovery"
        await self.transport.link_up()
        detail: dict[str, Any] = {"outcome": "serial recovery", "n": self.counters["boots"],
                                  "entered_by": entered_by}
        if outcome is not None:
            detail["boot_outcome"] = outcome
        self._event("recovery", {"entered_by": entered_by})
        self._event("boot", detail)

    def swap_seconds(self) -> float:
        """Wall time of a swap: ``swap_time_s``, or derived from the flash timings.

        Derived: MCUboot swap using scratch erases and programs every byte it moves three
        times (slot -> scratch -> slot, loader.c/swap_scratch.c ``boot_swap_sectors``), swap
        using move twice, overwrite-only once; it moves the larger image (rounded up to whole
        sectors) plus the trailer sector.
        """
        c = self.cfg
        if c.swap_time_s is not None:
            return c.swap_time_s
        sizes = [i.total_size for s in range(self.flash.slots)
                 if (i := self.flash.image_info(s)) is not None]
        if not sizes:
            return 0.0
        sec = c.flash_sector_size
        moved = (-(-max(sizes) // sec) + 1) * sec
        per_byte = c.flash_erase_sector_s / sec + (1 / c.flash_write_bps if c.flash_write_bps else 0)
        passes = {"swap-using-scratch": 3, "swap-using-move": 2}.get(c.mcuboot_mode, 1)
        return passes * moved * per_byte

    def _watchdog(self, version: str) -> None:
        self._event("crash", {"reason": "watchdog", "version": version})
        self._start_reboot("watchdog")

    def _app_confirm(self) -> None:
        if self.state != "running":
            return
        write_img_confirmed(self.flash, self.running_slot)
        self._event("app-confirm", {})


def _same_version(text: str, v: Version) -> bool:
    try:
        return Version.parse(text) == v
    except ValueError:
        return False


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, ep: UdpEndpoint) -> None:
        self.ep = ep

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.ep.received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.ep.dev.log.debug("udp error: %s", exc)


class UdpEndpoint:
    """One UDP port, kept bound from start to shutdown; while the device is off or rebooting,
    what arrives is dropped (``received``: not accepting) - silence, as from a real board
    that is down, not an ICMP "port unreachable". Closing it there let the kernel hand the
    port to another socket: with many simulated devices on one host (the fault schedules,
    32 at a time), another device bound it and answered this device's gateway (found by CI:
    a member read as running an image it never received)."""

    kind = "udp"

    def __init__(self, dev: SimDevice, host: str, port: int) -> None:
        self.dev = dev
        self.host = host
        self.port = port
        self._tr: asyncio.DatagramTransport | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def describe(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}

    async def open(self) -> None:
        await self.link_up()

    async def link_up(self) -> None:
        if self._tr is not None:
            return
        loop = asyncio.get_running_loop()
        for attempt in range(50):
            try:
                tr, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self.port))
                break
            except OSError:
                if self.port == 0 or attempt == 49:
                    raise
                await asyncio.sleep(0.05)  # port briefly busy: retry (timer, not a block)
        self._tr = tr
        self.port = tr.get_extra_info("sockname")[1]
        self.dev.log.debug("udp bound to %s", self.address)

    async def link_down(self) -> None:
        # Let answers already on the wire leave; the port stays bound (see the class docstring).
        loop = asyncio.get_running_loop()
        delay = self.dev.rsp_pipe.busy_until - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.dev.rsp_pipe.clear()

    async def close(self) -> None:
        if self._tr is not None:
            self._tr.close()
            self._tr = None

    def smp_idle(self) -> None:
        """The SMP work queue has nothing left to handle (nothing waits for it on UDP)."""

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        dev = self.dev
        dev.counters["rx_datagrams"] += 1
        if not dev.accepting():
            dev.counters["ignored_not_running"] += 1
            return
        addr = (addr[0], addr[1])
        if addr not in dev.udp_sources:
            dev.udp_sources.add(addr)
            dev.counters["udp_sources"] = len(dev.udp_sources)
        if dev._last_source is not None and dev._last_source != addr:
            dev.counters["udp_source_switches"] += 1  # interleaved request sources
        dev._last_source = addr

        def reply(rsp: bytes) -> None:
            dev.send_response(rsp, lambda b: self._sendto(b, addr))

        ok = dev.req_pipe.send(
            len(data), lambda: dev.frame_arrived(data, reply, limit_in_flight=True))
        if not ok:
            dev.counters["lost_requests"] += 1

    def _sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._tr is not None and not self._tr.is_closing():
            self._tr.sendto(data, addr)
            self.dev.counters["tx_datagrams"] += 1


class PtyEndpoint:
    """SMP over a pseudo-terminal with the MCUmgr serial framing (smp.packet).

    Which lines the device keeps is decided by ``serial_rx.LineRx`` (the ``uart`` or
    ``shell`` transport's RX buffers); kept lines are decoded as ``serial_util.c``
    ``mcumgr_serial_process_frag`` does (a start line begins a frame, continuation lines
    extend it, a bad length/CRC drops it).
    """

    kind = "serial"

    def __init__(self, dev: SimDevice) -> None:
        self.dev = dev
        self.master = -1
        self.slave = -1
        self.pty_path = ""
        scfg = dev.cfg.serial or SerialTransportConfig()
        self.scfg = scfg
        self.link: Path | None = scfg.link
        self.rx = LineRx(scfg.transport, scfg.rx_buf_count, scfg.line_buf_size,
                         scfg.rx_work_latency_s, free_when_idle=scfg.rx_free_when_idle)
        self._arrive = 0.0  # scheduled arrival of the line being decoded
        self._decoder: Any = None
        self._out = bytearray()
        self._writer_on = False

    @property
    def address(self) -> str:
        return str(self.link) if self.link is not None else self.pty_path

    def describe(self) -> dict[str, Any]:
        return {"pty": self.pty_path, "link": str(self.link) if self.link else None,
                "baud": self.scfg.baud, "serial_transport": self.scfg.transport}

    async def open(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.pty_path = os.ttyname(self.slave)
        if self.link is not None:
            self.link.parent.mkdir(parents=True, exist_ok=True)
            if self.link.is_symlink() or self.link.exists():
                self.link.unlink()
            self.link.symlink_to(self.pty_path)
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    async def link_up(self) -> None:
        self.rx.reset()
        self._decoder = None

    async def link_down(self) -> None:
        self.rx.reset()
        self._decoder = None

    def smp_idle(self) -> None:
        """Shell transport: the shell thread gets the CPU and decodes the waiting lines."""
        if self.rx.waiting:
            self.rx.drain(self._line)

    async def unplug(self, for_s: float) -> None:
        """The cable is pulled: the PTY goes away, and a new one appears at ``link`` later."""
        await self.close()
        self._out.clear()
        self._writer_on = False
        self.rx.reset()
        self._decoder = None
        await asyncio.sleep(for_s)
        await self.open()
        self.dev._event("replug", {"pty": self.pty_path})

    async def close(self) -> None:
        if self.master >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.master)
            if self._writer_on:
                loop.remove_writer(self.master)
            os.close(self.master)
            os.close(self.slave)
            self.master = self.slave = -1
        if self.link is not None and self.link.is_symlink():
            self.link.unlink()

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        dev = self.dev
        if not dev.accepting():
            dev.counters["discarded_serial_bytes"] += len(data)
            return
        # the device takes input in at the line rate too (FIFO with the link); each line is
        # its own delivery, so a line arrives when its last byte does, not with the rest of
        # the host's write
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl + 1
            piece = data[pos:end]
            arrive = dev.req_pipe.next_arrival(len(piece))
            dev.req_pipe.send(len(piece), functools.partial(self._feed, piece, arrive),
                              lossy=False)
            pos = end

    def _feed(self, data: bytes, arrive: float) -> None:
        dev = self.dev
        if not dev.accepting():
            dev.counters["discarded_serial_bytes"] += len(data)
            return
        # the pipe delivers a piece when its last byte is in (``arrive``, the scheduled
        # time, so a late event loop does not move it); its first byte came len/bandwidth
        # earlier (the UART ISR saw the bytes one by one in between)
        now = arrive
        self._arrive = arrive
        bw = dev.req_pipe.bandwidth
        first = now - (len(data) - 1) / bw if bw else now
        self.rx.stalls = dev.stalls
        before = dict(self.rx.counters)
        self.rx.feed(data, first, now, smp_busy=dev.smp_busy(), emit=self._line)
        for k, v in self.rx.counters.items():
            if v != before.get(k, 0):
                dev.counters[k] = v
        if any(k != "rx_lines" and self.rx.counters.get(k) != before.get(k)
               for k in self.rx.counters):
            dev._notify()

    def _line(self, line: bytes) -> None:
        if line.startswith(smppacket.START_DELIMITER):
            self._decoder = smppacket.decode()
            next(self._decoder)
        elif not line.startswith(smppacket.CONTINUE_DELIMITER) or self._decoder is None:
            return  # console output or a stray fragment: ignored like mcumgr_serial
        try:
            self._decoder.send(line)
        except StopIteration as done:
            self._decoder = None
            self._frame(bytes(done.value))
        except (SMPBadStartDelimiter, SMPBadContinueDelimiter, SMPBadCRC, ValueError):
            self.dev.counters["bad_serial_frames"] += 1
            self._decoder = None

    def _frame(self, frame: bytes) -> None:
        dev = self.dev
        if dev.cfg.link.request_loss and dev.rng.random() < dev.cfg.link.request_loss:
            dev.counters["lost_requests"] += 1
            return
        if self.scfg.transport == "shell" and len(frame) > self.scfg.shell_mtu:
            # larger than CONFIG_MCUMGR_TRANSPORT_SHELL_MTU: no answer, as on the device
            dev.counters["dropped_shell_mtu"] += 1
            dev._notify()
            return
        # mcumgr_serial_process_frag decodes length + packet + CRC16 into one pool netbuf
        dev.frame_arrived(frame, self._reply, limit_in_flight=True, netbuf_overhead=4,
                          at=self._arrive)

    def _reply(self, rsp: bytes) -> None:
        dev = self.dev
        if dev.cfg.link.response_loss and dev.rng.random() < dev.cfg.link.response_loss:
            dev.counters["lost_responses"] += 1
            return
        for line in smppacket.encode(rsp, line_length=dev.cfg.serial_line_length):
            dev.rsp_pipe.send(len(line), functools.partial(self._write, line), lossy=False)

    def _write(self, data: bytes) -> None:
        if self.master < 0:
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._out:
            try:
                n = os.write(self.master, self._out)
            except BlockingIOError:
                break
            except OSError:
                self._out.clear()
                break
            del self._out[:n]
        if self._out and not self._writer_on:
            loop.add_writer(self.master, self._flush)
            self._writer_on = True
        elif not self._out and self._writer_on:
            loop.remove_writer(self.master)
            self._writer_on = False
