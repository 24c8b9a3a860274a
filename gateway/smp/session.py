"""SMP session with one device: requests, responses, errors and the windowed image upload.

Owns the conversation over one transport: sequence numbers (per session, so that thousands
of sessions never collide), matching responses to requests, explicit timeouts, typed errors
(SMP v1 ``rc`` and v2 ``err {group, rc}``), the device's MCUmgr parameters and the image
upload with up to W chunks in flight.

Messages are the ``smp``/``smpclient`` pydantic models (encoding, decoding, validation); the
request/response loop is written here because smpclient's ``SMPClient.request`` is
stop-and-wait (one request in flight) and its ``upload`` can therefore not pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from smp import error as smperr
from smp import header as smphdr
from smp.image_management import ImageState
from smpclient.requests.image_management import (
    ImageErase,
    ImageStatesRead,
    ImageStatesWrite,
)
from smpclient.requests.os_management import (
    BootloaderInformationRead,
    EchoWrite,
    MCUMgrParametersRead,
    ResetWrite,
)

from gateway.smp.codec import DecodeError, decode_body, load_response
from gateway.smp.errors import SMPError, SMPProtocolError, SMPTimeout, UploadError
from gateway.smp.transport import Transport, TransportError
from gateway.smp.tuning import Plan, TuningStore
from gateway.smp.upload import UploadStats, WindowedUpload, upload_plan

# SMPError & co. live in gateway.smp.errors (so that upload.py needs nothing from here);
# they stay importable from this module, where the rest of the gateway imports them.
__all__ = ["BootloaderInfo", "McumgrParams", "Plan", "SMPError", "SMPProtocolError", "SMPSession",
           "SMPTimeout", "UploadError", "UploadStats"]

log = logging.getLogger(__name__)
_PARAMS_LOGGED: set[str] = set()  # devices whose missing MCUmgr parameters were logged at INFO

T = TypeVar("T")


@dataclass
class BootloaderInfo:
    name: str | None  # "MCUboot" for MCUboot
    mode: int | None  # MCUboot mode number (smp.os_management.MCUbootMode); None = not reported
    no_downgrade: bool  # CONFIG_MCUBOOT_BOOTLOADER_NO_DOWNGRADE


@dataclass
class McumgrParams:
    buf_size: int
    buf_count: int
    reported: bool  # False: the device did not answer (plain smp_svr) - defaults in use


class SMPSession:
    """One logical connection to one device's SMP server."""

    def __init__(self, transport: Transport, *, device_id: str = "?", timeout_s: float = 5.0) -> None:
        self.transport = transport
        self.device_id = device_id
        self.timeout_s = timeout_s
        self._seq = 0
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        self.params: McumgrParams | None = None
        self.srtt: float | None = None  # smoothed round-trip time of small requests

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        await self.transport.open()
        self._dead = None
        self._reader = asyncio.create_task(self._read_loop(), name=f"smp-rx-{self.device_id}")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        await self.transport.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportError("session closed"))
        self._pending.clear()

    async def __aenter__(self) -> SMPSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        try:
            while True:
                pkt = await self.transport.recv()
                if len(pkt) < smphdr.Header.SIZE:
                    log.debug("device=%s short packet ignored (%d bytes)", self.device_id, len(pkt))
                    continue
                seq = pkt[6]
                fut = self._pending.pop(seq, None)
                if fut is None or fut.done():
                    # a late answer to a request that timed out, or a duplicate datagram
                    log.debug("device=%s unmatched response seq=%d dropped", self.device_id, seq)
                    continue
                fut.set_result(pkt)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # transport died: fail every waiter
            self._dead = exc
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(exc)
            self._pending.clear()

    # -- requests ------------------------------------------------------------------------
    def _next_seq(self) -> int:
        for _ in range(256):
            self._seq = (self._seq + 1) & 0xFF
            if self._seq not in self._pending:
                return self._seq
        raise RuntimeError("256 requests in flight")

    def _submit(self, factory: Callable[[int], Any]) -> tuple[Any, asyncio.Future[bytes]]:
        if self._dead is not None:
            raise TransportError(f"link to {self.device_id} is down: {self._dead}")
        seq = self._next_seq()
        req = factory(seq)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        return req, fut

    def _decode(self, req: Any, frame: bytes, *, raw: bool = False) -> Any:
        """The response model for ``req`` from ``frame`` (``raw``: the decoded CBOR map);
        SMPError (device error) or SMPProtocolError (not a valid answer to ``req``) - never
        another exception type."""
        name = type(req).__name__

        def bad(why: str) -> SMPProtocolError:
            return SMPProtocolError(name, None, smperr.MGMT_ERR.EUNKNOWN, why)

        try:
            hdr, body = decode_body(frame)
        except DecodeError as exc:
            raise bad(str(exc)) from exc
        rh = req.header
        if (int(hdr.group_id) != int(rh.group_id) or hdr.command_id != rh.command_id
                or int(hdr.op) != int(rh.op) + 1):
            raise bad(f"answer to another request (op {int(hdr.op)} group {int(hdr.group_id)} "
                      f"command {hdr.command_id})")
        if not isinstance(body, dict):
            raise bad("response is not a map")
        err = body.get("err")
        if isinstance(err, dict) and "rc" in err:
            rc_e, grp = err["rc"], err.get("group", -1)
            if not isinstance(rc_e, int) or not isinstance(grp, int):
                raise bad(f"malformed err field: {err!r}")
            if rc_e != 0:
                raise SMPError(name, grp, rc_e)
        rc = body.get("rc")
        if isinstance(rc, int) and rc != 0 and set(body) <= {"rc", "rsn"}:
            rsn = body.get("rsn")
            raise SMPError(name, None, rc, rsn if isinstance(rsn, str) else None)
        if raw:
            return body
        try:
            return load_response(req._Response, hdr, body, frame)
        except Exception as exc:
            raise bad(f"malformed response: {exc}") from exc

    def _no_answer_hint(self) -> str:
        """Where the request went and what an operator should check (for SMPTimeout)."""
        t = self.transport
        addr = getattr(t, "address", "?")
        if t.name == "udp":
            return (f" from {addr} (UDP): check that the device is powered and on the network, "
                    "that host/port in the gateway config are its SMP UDP server (port 1337 by "
                    "default) and that no firewall drops UDP")
        if t.name == "serial":
            return (f" on {addr}: check the baud rate and that the firmware enables the MCUmgr "
                    "UART transport (CONFIG_MCUMGR_TRANSPORT_UART) on this port")
        return f" via {t.name} {addr}"

    async def request(
        self, factory: Callable[[int], Any], *, timeout_s: float | None = None, retries: int = 0,
        raw: bool = False,
    ) -> Any:
        """Send ``factory(seq)`` and return the decoded response; SMPError/SMPTimeout otherwise.

        ``retries`` re-sends (with a new sequence number) after a timeout: only for idempotent
        requests. A reset is never retried.
        """
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        name = "request"
        for attempt in range(retries + 1):
            req, fut = self._submit(factory)
            name = type(req).__name__
            t0 = time.monotonic()
            try:
                await self.transport.send(req.BYTES)
                frame = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                self._pending.pop(req.header.sequence, None)
                log.debug("device=%s %s timed out (attempt %d)", self.device_id, name, attempt + 1)
                continue
            except BaseException:
                self._pending.pop(req.header.sequence, None)
                raise
            rtt = time.monotonic() - t0
            self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt
            if log.isEnabledFor(logging.DEBUG):  # `smp-gateway -v probe`: every exchange
                h = req.header
                log.debug("device=%s smp %s op=%d group=%d cmd=%d seq=%d req=%dB rsp=%dB rtt=%.1fms",
                          self.device_id, name, int(h.op), int(h.group_id), h.command_id, h.sequence,
                          len(req.BYTES), len(frame), rtt * 1000)
            try:
                return self._decode(req, frame, raw=raw)
            except SMPProtocolError as exc:
                if attempt == retries:
                    raise
                log.warning("device=%s %s: unusable answer (%s); asking again", self.device_id,
                            name, exc.rsn)
        raise SMPTimeout(f"{self.device_id}: no answer to {name} within {timeout:g}s x{retries + 1}"
                         f"{self._no_answer_hint()}")

    # -- typed helpers -------------------------------------------------------------------
    async def echo(self, text: str = "ping", timeout_s: float | None = None, retries: int = 0) -> str:
        rsp = await self.request(lambda s: EchoWrite(d=text, sequence=s), timeout_s=timeout_s,
                                 retries=retries)
        return str(rsp.r)

    async def image_state(self, timeout_s: float | None = None, retries: int = 2) -> list[ImageState]:
        try:
            rsp = await self.request(lambda s: ImageStatesRead(sequence=s), timeout_s=timeout_s,
                                     retries=retries)
        except SMPError as exc:
            if exc.not_supported:
                raise SMPError(exc.request, exc.group, exc.rc,
                               f"{self.device_id} has no image management: its firmware must be "
                               "built with CONFIG_MCUMGR_GRP_IMG=y (and CONFIG_IMG_MANAGER=y) to be "
                               "updated over SMP") from exc
            raise
        return list(rsp.images)

    async def image_test(self, hash_: bytes, retries: int = 2) -> list[ImageState]:
        rsp = await self.request(lambda s: ImageStatesWrite(hash=hash_, confirm=False, sequence=s),
                                 retries=retries)
        return list(rsp.images)

    async def image_confirm(self, hash_: bytes | None, retries: int = 2) -> list[ImageState]:
        rsp = await self.request(lambda s: ImageStatesWrite(hash=hash_, confirm=True, sequence=s),
                                 retries=retries)
        return list(rsp.images)

    async def image_erase(self, slot: int | None = None) -> None:
        await self.request(lambda s: ImageErase(slot=slot, sequence=s), retries=1)

    async def reset(self, timeout_s: float = 2.0) -> bool:
        """Ask for a reset; True if the device acknowledged. Never retried (see request)."""
        try:
            await self.request(lambda s: ResetWrite(sequence=s), timeout_s=timeout_s)
            return True
        except (SMPTimeout, SMPProtocolError):
            return False

    async def mcumgr_params(self, timeout_s: float | None = None) -> McumgrParams:
        """buf_size/buf_count; falls back to one 384-byte buffer when the device won't say."""
        if self.params is not None:
            return self.params
        try:
            rsp = await self.request(lambda s: MCUMgrParametersRead(sequence=s), timeout_s=timeout_s,
                                     retries=1)
            self.params = McumgrParams(int(rsp.buf_size), int(rsp.buf_count), True)
        except (SMPError, SMPTimeout) as exc:
            # a firmware fact, the same at every session: said once per device, then debug
            first = self.device_id not in _PARAMS_LOGGED
            if len(_PARAMS_LOGGED) >= 4096:  # bounded: discovered ids come and go
                _PARAMS_LOGGED.clear()
            _PARAMS_LOGGED.add(self.device_id)
            log.log(logging.INFO if first else logging.DEBUG,
                    "device=%s MCUmgr parameters unavailable (%s): window 1, default buffer",
                    self.device_id, exc)
            self.params = McumgrParams(384, 1, False)
        return self.params

    async def bootloader_info(self, timeout_s: float | None = None) -> BootloaderInfo | None:
        """os_mgmt bootloader info (group 0 cmd 8): name, and for MCUboot the ``mode`` query.

        Read as a raw map: Zephyr answers the mode query ``{"mode": N, "no-downgrade": true}``
        (os_mgmt.c ``os_mgmt_bootloader_info``), which ``smp``'s response model does not
        describe (it wants a ``bootloader`` key). None when the firmware has no such command.
        """
        try:
            name_rsp = await self.request(lambda s: BootloaderInformationRead(sequence=s),
                                          timeout_s=timeout_s, retries=1, raw=True)
        except (SMPError, SMPTimeout):
            return None
        name = name_rsp.get("bootloader")
        info = BootloaderInfo(name if isinstance(name, str) else None, None, False)
        if info.name != "MCUboot":
            return info
        try:
            mode_rsp = await self.request(lambda s: BootloaderInformationRead(query="mode", sequence=s),
                                          timeout_s=timeout_s, retries=1, raw=True)
        except (SMPError, SMPTimeout):
            return info
        mode = mode_rsp.get("mode")
        info.mode = mode if isinstance(mode, int) and not isinstance(mode, bool) else None
        info.no_downgrade = mode_rsp.get("no-downgrade") is True
        return info

    # -- upload --------------------------------------------------------------------------
    async def upload(
        self,
        image: bytes,
        *,
        image_num: int = 0,
        window: int | None = None,
        chunk_cap: int | None = None,
        first_timeout_s: float = 30.0,
        progress: Callable[[int, int], None] | None = None,
        max_stalls: int = 8,
        store: TuningStore | None = None,
        deadline_s: float | None = None,
    ) -> UploadStats:
        """Upload ``image`` to the secondary slot, tuned to the device and its link.

        Starts from what is known (MCUmgr parameters, the link's MTU, serial framing) and
        what ``store`` remembers of this device (``gateway.journal.Journal`` keeps it across
        restarts); discovers the packet size (a first chunk that gets no answer is re-sent
        smaller) and the window (grows while the device keeps up, drops back on the first
        loss); ``window``/``chunk_cap`` are the device config's overrides. The first chunk
        (``off=0`` with ``len``/``sha``) goes alone: the device may erase the slot first, and
        its answer says where an interrupted upload of the same ``sha`` left off. Policy in
        ``gateway/smp/tuning.py``, protocol in ``gateway/smp/upload.py`` (go-back-N on the
        device's ``off``, adaptive RTO).
        """
        return await WindowedUpload(
            self, image, image_num=image_num, window=window, chunk_cap=chunk_cap,
            first_timeout_s=first_timeout_s, progress=progress, max_stalls=max_stalls,
            store=store, deadline_s=deadline_s,
        ).run()

    async def upload_plan(self, *, image_size: int = 1 << 20, image_num: int = 0,
                          window: int | None = None, chunk_cap: int | None = None,
                          store: TuningStore | None = None) -> Plan:
        """The packet size and window an upload would start with now, and why
        (``plan.describe()``: ``chunk=… packet=… window=… reason="…"``)."""
        return await upload_plan(self, image_size=image_size, image_num=image_num, window=window,
                                 chunk_cap=chunk_cap, store=store)
