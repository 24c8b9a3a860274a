"""One LwM2M client endpoint: the objects of one managed device, on its own UDP socket.

A server tells clients apart by their source address, so each endpoint has its own aiocoap
context (one UDP socket, ephemeral port) that both serves the server's requests and sends the
registration. A registration after the first (the server forgot the client) goes from a fresh
socket: the old one's CoAP message layer remembers the previous server session's Message IDs
(deduplication, EXCHANGE_LIFETIME 247 s), and a restarted server that happens to reuse one
(Wakaama does, often) would get a replay of an answer to its predecessor - stale values under
another token - instead of an answer. The old socket closes after ``request_timeout_s`` (a
request in flight on it, e.g. a coap:// block, finishes first).

Registration (``POST /rd?ep=&lt=&lwm2m=&b=U`` with the object links), updates
(``POST /rd/<id>``) at half the lifetime, and a new registration when the server answers an
update 4.04 (it forgot the client: restart, lifetime expired) or does not answer before the
lifetime ends. Every request is bounded by ``request_timeout_s``; retries back off to 60 s.

``coaps://`` servers: DTLS 1.2 with a pre-shared key (LwM2M security mode 0) on aiocoap's
tinydtls client transport (``DTLSSocket``, the ``lwm2m-dtls`` extra). The endpoint's context then
has that transport only - no plain-CoAP socket at all, so nothing reaches the objects except
over the authenticated session, and nothing is ever sent in the clear (no fallback) - and it
keeps a reference to the session it registered on (the server sends its requests back on it).
A handshake that fails or gets no answer is one log line naming the PSK identity and where the
key comes from (``last_error``); the key itself is never logged.

Objects: /0 Security and /1 Server as a configured (non-bootstrap) client has them, /3 Device
(manufacturer/model from the config, serial number = the device's id in the gateway, firmware
version = the version the device reports running, Reboot, Error Code), /5 Firmware Update
(resources 0-9; state in ``firmware.FwRecord``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from gateway.sources.lwm2m import codec
from gateway.sources.lwm2m.firmware import DOWNLOADED, DOWNLOADING, IDLE, UPDATING, FwRecord
from gateway.sources.lwm2m.objects import CoapError, Res, Tree
from gateway.sources.settings import Lwm2mSourceConfig

log = logging.getLogger("gateway.sources.lwm2m")

SHORT_SERVER_ID = 1
REBOOT_ANSWER_S = 10.0  # a Reboot is answered within this (Wakaama waits 15 s for it)
PUSH_IDLE_S = 60.0  # a Block1 transfer that stops this long is abandoned (Result 4)
SCHEMES_PULL = ("http", "https", "coap")  # coaps: needs DTLS (the lwm2m-dtls extra), later


def safe_name(ep: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in ep)[:64]
    return f"{keep}-{hashlib.sha256(ep.encode()).hexdigest()[:8]}"


class DtlsUnavailable(RuntimeError):
    """coaps:// configured, but aiocoap's DTLS transport (DTLSSocket) is not installed."""


def psk_credentials(cfg: Lwm2mSourceConfig, identity: str) -> dict[str, Any]:
    """aiocoap's client credentials for the server: the PSK (hex in the config: (c)) and the
    identity. Raises ValueError naming ``source.psk_key`` when the key is not hex, or empty."""
    assert cfg.psk_key is not None
    raw = cfg.psk_key.get().strip()
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        raise ValueError(f"source.psk_key ({cfg.psk_key!r}) is not hex") from None
    if not key or len(key) > 64:
        raise ValueError(f"source.psk_key ({cfg.psk_key!r}) must be 1..64 bytes")
    if not identity or len(identity.encode()) > 128:
        raise ValueError(f"PSK identity {identity[:40]!r} must be 1..128 bytes")
    return {cfg.server.rstrip("/") + "/*": {"dtls": {
        "psk": {"hex": key.hex()}, "client-identity": {"ascii": identity}}}}


class Endpoint:
    def __init__(self, cfg: Lwm2mSourceConfig, device_id: str, name: str, state_dir: Path,
                 on_change: Callable[[Endpoint, str], None],
                 reboot: Callable[[str], Awaitable[str | None]] | None = None,
                 gateway_id: str = "") -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.name = name
        self.dir = state_dir / "lwm2m"
        self.file = self.dir / f"{safe_name(name)}.json"
        self.push_file = self.dir / "packages" / f"{safe_name(name)}.bin"
        self.rec = FwRecord.load(self.file)
        self.on_change = on_change
        self.reboot = reboot
        self.ctx: aiocoap.Context | None = None
        self.location: list[str] | None = None
        self.registered = asyncio.Event()
        self.registrations = 0  # how many times it registered (tests, status)
        self._task: asyncio.Task[None] | None = None
        self._site: Any = None  # the aiocoap Site of the objects, shared by every socket
        self._ctx_registered = False  # a registration went from the current socket
        self._retiring: set[asyncio.Task[None]] = set()  # old sockets, closing
        self._push: dict[str, Any] | None = None  # Block1 transfer in progress
        self._push_timer: asyncio.TimerHandle | None = None
        # set by a cancel of the current package, cleared by the next package: a download in
        # flight for it stops at once (``Lwm2mSource.fetch``)
        self.cancel_seen = asyncio.Event()
        self.secure = cfg.server.startswith("coaps://")
        self.psk_identity = cfg.psk_identity.format(endpoint=name, device_id=device_id,
                                                    gateway_id=gateway_id)
        self._session: Any = None  # coaps: the DTLS session registered on (kept alive)
        self.last_error = ""  # why the last registration attempt failed (status, tests)
        self.failed = asyncio.Event()  # set when a registration attempt failed
        self.tree = self._build()

    # -- the objects ---------------------------------------------------------------------------
    def _build(self) -> Tree:
        cfg = self.cfg
        t = Tree()
        t.objects[0] = {0: {
            0: Res(0, "str", "R", get=lambda: cfg.server),
            1: Res(1, "bool", "R", get=lambda: False),  # not a bootstrap server
            2: Res(2, "int", "R", get=lambda: 0 if self.secure else 3),  # PSK | NoSec
            10: Res(10, "int", "R", get=lambda: SHORT_SERVER_ID),
        }}
        t.objects[1] = {0: {
            0: Res(0, "int", "R", get=lambda: SHORT_SERVER_ID),
            1: Res(1, "int", "R", get=lambda: int(cfg.lifetime_s)),
            2: Res(2, "int", "R", get=lambda: 0),
            3: Res(3, "int", "R", get=lambda: 0),
            6: Res(6, "bool", "R", get=lambda: False),
            7: Res(7, "str", "R", get=lambda: "U"),
            8: Res(8, "none", "E", exe=self._exec_update_trigger),
        }}
        t.objects[3] = {0: {
            0: Res(0, "str", "R", get=lambda: cfg.manufacturer),
            1: Res(1, "str", "R", get=lambda: cfg.model),
            2: Res(2, "str", "R", get=lambda: self.device_id),
            3: Res(3, "str", "R", get=lambda: self.rec.running_version),
            4: Res(4, "none", "E", exe=self._exec_reboot),
            11: Res(11, "int", "R", multi=True, get=lambda: [self._error_code()]),
            16: Res(16, "str", "R", get=lambda: "U"),
        }}
        t.objects[5] = {0: {
            0: Res(0, "opaque", "W", set=self._write_package, raw_put=self._put_package),
            1: Res(1, "str", "RW", get=lambda: self.rec.uri, set=self._write_uri),
            2: Res(2, "none", "E", exe=self._exec_update),
            3: Res(3, "int", "R", get=lambda: self.rec.state),
            4: Res(4, "bool", "RW", get=lambda: False, set=self._write_ignored),
            5: Res(5, "int", "R", get=lambda: self.rec.result),
            6: Res(6, "str", "R", get=lambda: self.rec.pkg_name),
            7: Res(7, "str", "R", get=lambda: self.rec.pkg_version),
            8: Res(8, "int", "R", multi=True, get=lambda: [0, 2, 3]),  # CoAP, HTTP 1.1, HTTPS 1.1
            9: Res(9, "int", "R", get=lambda: 2),  # delivery: pull and push
        }}
        return t

    def _error_code(self) -> int:
        """/3/0/11: 0 "no error" - the spec's codes are power/memory/peripheral faults the
        gateway does not measure; a failed update is told by /5/0/5, not here."""
        return 0

    # -- state changes ---------------------------------------------------------------------------
    def set(self, **changes: Any) -> None:
        """Change the /5 record, persist it, notify what changed, tell the source."""
        before = self.rec.snapshot()
        for k, v in changes.items():
            setattr(self.rec, k, v)
        after = self.rec.snapshot()
        if before == after:
            return
        self.rec.save(self.file)
        for key, (oid, rid) in {"state": (5, 3), "result": (5, 5), "uri": (5, 1),
                                 "pkg_name": (5, 6), "pkg_version": (5, 7),
                                 "running_version": (3, 3)}.items():
            if before[key] != after[key]:
                self.tree.changed(oid, 0, rid)
        if before["state"] != after["state"] or before["result"] != after["result"]:
            log.info("lwm2m ep=%s device=%s State=%d Result=%d phase=%s %s", self.name,
                     self.device_id, self.rec.state, self.rec.result, self.rec.phase,
                     self.rec.detail)
        self.on_change(self, self.rec.phase)

    def _new_package(self, **changes: Any) -> None:
        self.cancel_seen.clear()
        self.set(gen=self.rec.gen + 1, canceled=None, result=0, detail="", pkg_name="",
                 pkg_version="", **changes)

    def cancel(self, why: str) -> None:
        """Empty Package URI / Package: back to Idle, whatever the state (spec: "cancel/reset")."""
        self._abort_push()
        running = self.rec.phase in ("install",) or self.rec.state == UPDATING
        self.set(state=IDLE, result=0, uri="", phase="idle", pkg_name="", pkg_version="",
                 detail=why,
                 # a second empty write keeps the first cancel open until it is acknowledged
                 canceled=why if running or self.rec.phase != "idle" else self.rec.canceled)
        self.push_file.unlink(missing_ok=True)
        if self.rec.canceled:
            self.cancel_seen.set()

    # -- /5 handlers ---------------------------------------------------------------------------
    async def _write_ignored(self, v: codec.Value) -> None:
        return None

    async def _write_uri(self, v: codec.Value) -> None:
        uri = v if isinstance(v, str) else ""
        if not uri:
            self.cancel("the server wrote an empty Package URI (cancel)")
            return
        if len(uri) > 2048:
            raise CoapError(Code.BAD_REQUEST, "Package URI longer than 2048 characters")
        if self.rec.state == UPDATING and self.rec.phase == "install":
            # the engine is installing: only a cancel (empty URI) may stop it
            raise CoapError(Code.BAD_REQUEST, "State is 3 (Updating): cancel first")
        self._abort_push()
        try:
            parts = urlsplit(uri)
            scheme, host = parts.scheme.lower(), parts.hostname
        except ValueError:
            scheme, host = "", None
        if not scheme or not host:
            self._new_package(state=IDLE, result=7, uri=uri, phase="idle",
                              detail=f"invalid Package URI {uri[:100]!r}")
            return
        if scheme not in SCHEMES_PULL:
            self._new_package(state=IDLE, result=9, uri=uri, phase="idle",
                              detail=f"unsupported protocol {scheme!r} (supported: "
                                     f"{', '.join(SCHEMES_PULL)})")
            return
        self._new_package(state=DOWNLOADING, uri=uri, package=None, phase="fetch")

    async def _write_package(self, v: codec.Value) -> None:
        """A whole Package in one request (TLV/SenML or a single opaque message)."""
        data = v if isinstance(v, bytes) else (v.encode() if isinstance(v, str) else b"")
        if not data:
            self.cancel("the server wrote an empty Package (cancel)")
            return
        self._begin_push()
        self._push_chunk(0, data)
        self._end_push()

    async def _put_package(self, req: aiocoap.Message) -> aiocoap.Message:
        """PUSH: the Package by Block1, each block appended to a file as it comes (bounded by
        ``max_package_bytes``; never the whole package in memory)."""
        b = req.opt.block1
        try:
            if b is None:
                await self._write_package(req.payload)
                return aiocoap.Message(code=Code.CHANGED)
            size = 1 << (b.size_exponent + 4)
            start = b.block_number * size
            if b.block_number == 0:
                if not req.payload and not b.more:
                    self.cancel("the server wrote an empty Package (cancel)")
                    return aiocoap.Message(code=Code.CHANGED, block1=b)
                self._begin_push()
            elif self._push is None or start != self._push["size"]:
                # a block out of order, or of a transfer this process does not hold
                return aiocoap.Message(code=Code.REQUEST_ENTITY_INCOMPLETE)
            self._push_chunk(start, req.payload)
            if b.more:
                return aiocoap.Message(code=Code.CONTINUE, block1=BlockOption.BlockwiseTuple(
                    b.block_number, True, b.size_exponent))
            self._end_push()
            return aiocoap.Message(code=Code.CHANGED, block1=BlockOption.BlockwiseTuple(
                b.block_number, False, b.size_exponent))
        except CoapError as exc:
            if exc.code == Code.REQUEST_ENTITY_TOO_LARGE:
                # Size1: the most the client takes (RFC 7959 4), so no retry in smaller blocks
                return aiocoap.Message(code=exc.code, payload=str(exc).encode()[:200],
                                       size1=self.cfg.max_package_bytes)
            return aiocoap.Message(code=exc.code, payload=str(exc).encode()[:200])

    def _begin_push(self) -> None:
        if self.rec.state == UPDATING and self.rec.phase == "install":
            raise CoapError(Code.BAD_REQUEST, "State is 3 (Updating): cancel first")
        self._abort_push()
        self.push_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        part = self.push_file.with_suffix(".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._push = {"fd": fd, "size": 0, "part": part}
        self._new_package(state=DOWNLOADING, uri="", package=None, phase="push")
        self._arm_push_timer()

    def _push_chunk(self, start: int, data: bytes) -> None:
        p = self._push
        assert p is not None
        if start + len(data) > self.cfg.max_package_bytes:
            self._abort_push()
            self.set(state=IDLE, result=2, phase="idle",
                     detail=f"package larger than max_package_bytes ({self.cfg.max_package_bytes})")
            raise CoapError(Code.REQUEST_ENTITY_TOO_LARGE, "package too large")
        os.write(p["fd"], data)
        p["size"] = start + len(data)
        self._arm_push_timer()

    def _end_push(self) -> None:
        p = self._push
        assert p is not None
        self._push = None
        self._disarm_push_timer()
        os.fsync(p["fd"])
        os.close(p["fd"])
        os.replace(p["part"], self.push_file)
        log.info("lwm2m ep=%s package received by PUSH: %d bytes", self.name, p["size"])
        self.set(package=str(self.push_file), phase="check")

    def _abort_push(self) -> None:
        p, self._push = self._push, None
        self._disarm_push_timer()
        if p is not None:
            with contextlib.suppress(OSError):
                os.close(p["fd"])
            Path(p["part"]).unlink(missing_ok=True)

    def _arm_push_timer(self) -> None:
        self._disarm_push_timer()
        self._push_timer = asyncio.get_running_loop().call_later(PUSH_IDLE_S, self._push_stalled)

    def _disarm_push_timer(self) -> None:
        if self._push_timer is not None:
            self._push_timer.cancel()
            self._push_timer = None

    def _push_stalled(self) -> None:
        self._push_timer = None
        if self._push is not None:
            self._abort_push()
            self.set(state=IDLE, result=4, phase="idle",
                     detail=f"the package transfer stopped for {PUSH_IDLE_S:.0f}s")

    async def _exec_update(self, _args: bytes) -> None:
        """Update: only in State 2 (Downloaded), else 4.05. It starts the engine's normal flow;
        every check, the test boot, the health check and the confirm stay the gateway's."""
        if self.rec.state != DOWNLOADED or self.rec.phase != "wait":
            raise CoapError(Code.METHOD_NOT_ALLOWED, f"Update needs State 2, State is {self.rec.state}")
        self.set(state=UPDATING, phase="install", result=0, detail="")

    async def _exec_reboot(self, _args: bytes) -> None:
        """Reboot (/3/0/4): an SMP reset of the device through the gateway's maintenance-window
        gate (c) and never while an update of it is open (the daemon's ``reboot_device``).
        Answered once that is decided - 2.04 when the device acknowledged the reset, 4.03 with
        the reason when the gate refused it, 5.03 when it failed or took longer than
        ``REBOOT_ANSWER_S`` (aiocoap sends the empty ACK first; the answer goes separately) - so
        a server never reads a reboot that did not happen as done."""
        if self.reboot is None:
            raise CoapError(Code.METHOD_NOT_ALLOWED, "reboot is not wired in this process")
        try:
            why = await asyncio.wait_for(self.reboot(self.device_id), REBOOT_ANSWER_S)
        except Exception as exc:
            log.warning("lwm2m ep=%s Reboot of %s failed: %s: %s", self.name, self.device_id,
                        type(exc).__name__, exc)
            raise CoapError(Code.SERVICE_UNAVAILABLE, f"reboot failed: {type(exc).__name__}") from None
        if why:
            log.warning("lwm2m ep=%s Reboot of %s not done: %s", self.name, self.device_id, why)
            raise CoapError(Code.FORBIDDEN, f"not rebooted: {why}")
        log.info("lwm2m ep=%s Reboot: %s reset", self.name, self.device_id)

    async def _exec_update_trigger(self, _args: bytes) -> None:
        asyncio.get_running_loop().create_task(self._update_now())

    # -- registration ----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._site = self.tree.site()
        self.ctx = await self._open()
        self._task = asyncio.create_task(self._run(), name=f"lwm2m-{self.name}")

    async def _open(self) -> aiocoap.Context:
        if not self.secure:
            return await aiocoap.Context.create_server_context(
                self._site, bind=(self.cfg.bind_host, 0), transports=["udp6"])
        if importlib.util.find_spec("DTLSSocket") is None:  # optional: the lwm2m-dtls extra
            raise DtlsUnavailable("coaps:// needs aiocoap's DTLS transport: install the "
                                  "lwm2m-dtls extra (pip install 'smp-gateway[lwm2m-dtls]', "
                                  "DTLSSocket)")
        creds = psk_credentials(self.cfg, self.psk_identity)
        # the DTLS client transport only: no plain-CoAP socket to serve or send on
        ctx = await aiocoap.Context.create_server_context(self._site, transports=["tinydtls"])
        ctx.client_credentials.load_from_dict(creds)
        return ctx

    async def _new_socket(self) -> None:
        """Before registering again: a fresh socket, so that nothing the old one's message
        layer remembers of an earlier server session (Message IDs it deduplicates, the
        answers it would replay) can answer the new session's requests (module docstring)."""
        old, self.ctx = self.ctx, await self._open()
        self._ctx_registered = False
        self._session = None
        if old is not None:
            task = asyncio.create_task(self._retire(old), name=f"lwm2m-{self.name}-retire")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, ctx: aiocoap.Context) -> None:
        try:
            await asyncio.sleep(self.cfg.request_timeout_s)  # bounded: in-flight requests end
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ctx.shutdown(), 5.0)

    async def close(self, deregister: bool = True) -> None:
        self._abort_push()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if deregister and self.location and self.ctx is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._request(aiocoap.Message(
                    code=Code.DELETE, uri=self._uri("/".join(self.location)))), 2.0)
        if self.ctx is not None:
            with contextlib.suppress(Exception):
                await self.ctx.shutdown()
            self.ctx = None
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        self.registered.clear()

    def _uri(self, path: str) -> str:
        base = self.cfg.server.rstrip("/")
        return f"{base}/{path}"

    async def _request(self, msg: aiocoap.Message) -> aiocoap.Message:
        assert self.ctx is not None
        return await asyncio.wait_for(self.ctx.request(msg).response, self.cfg.request_timeout_s)

    async def _register(self) -> bool:
        q = [f"ep={self.name}", f"lt={int(self.cfg.lifetime_s)}", "lwm2m=1.0", "b=U"]
        msg = aiocoap.Message(code=Code.POST, uri=self._uri("rd"), payload=self.tree.links().encode(),
                              content_format=codec.CT_LINK)
        msg.opt.uri_query = tuple(q)
        resp = await self._request(msg)
        if resp.code != Code.CREATED:
            log.warning("lwm2m ep=%s registration refused: %s %s", self.name, resp.code,
                        resp.payload[:100])
            return False
        self.location = list(resp.opt.location_path)
        if self.secure:
            self._session = resp.remote  # the server's requests come back on this session
        self.last_error = ""
        self.failed.clear()
        self.registrations += 1
        self._ctx_registered = True
        self.registered.set()
        log.info("lwm2m ep=%s registered at %s as /%s (lifetime %ds)", self.name, self.cfg.server,
                 "/".join(self.location), int(self.cfg.lifetime_s))
        self.tree.changed_all()  # every observation the server kept gets the current values
        return True

    def _why(self, exc: Exception) -> str:
        """One line: what failed. Over coaps a handshake that fails (alert) or gets no answer
        names the PSK identity and where the key comes from - never the key."""
        what = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if self.secure and isinstance(exc, (TimeoutError, aiocoap.error.NetworkError)):
            return (f"DTLS handshake as PSK identity {self.psk_identity!r} failed or got no "
                    f"answer ({what}): check source.psk_key ({self.cfg.psk_key!r}) and the "
                    "identity the server expects")
        return what

    async def _update(self) -> Code | None:
        if not self.location:
            return None
        msg = aiocoap.Message(code=Code.POST, uri=self._uri("/".join(self.location)))
        return (await self._request(msg)).code

    async def _update_now(self) -> None:
        with contextlib.suppress(Exception):
            code = await self._update()
            if code == Code.NOT_FOUND:
                self.registered.clear()

    async def _run(self) -> None:
        delay = 1.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._ctx_registered:  # the server forgot this client: a new session
                    await self._new_socket()
                if not await self._register():
                    raise ConnectionError("registration refused")
                delay = 1.0
                expires = loop.time() + self.cfg.lifetime_s
                while self.registered.is_set():
                    await asyncio.sleep(max(1.0, min(self.cfg.lifetime_s * 0.5,
                                                     expires - loop.time() - 1.0)))
                    try:
                        code = await self._update()
                    except (TimeoutError, aiocoap.error.Error) as exc:
                        log.warning("lwm2m ep=%s registration update failed: %s", self.name, exc)
                        if loop.time() >= expires:
                            self.registered.clear()
                        continue
                    if code == Code.CHANGED:
                        expires = loop.time() + self.cfg.lifetime_s
                    else:
                        log.warning("lwm2m ep=%s registration update answered %s: registering "
                                    "again", self.name, code)
                        self.registered.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.registered.clear()
                self.last_error = self._why(exc)
                self.failed.set()
                log.warning("lwm2m ep=%s cannot register at %s: %s; again in %.0fs", self.name,
                            self.cfg.server, self.last_error, delay)
                if isinstance(exc, (DtlsUnavailable, ValueError)):
                    delay = 60.0  # a configuration error: no quick retries
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
