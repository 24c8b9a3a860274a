"""LwM2M fleet source: one LwM2M client endpoint per managed device, on aiocoap.

``source: {kind: lwm2m, server: coap://host:5683, endpoint: "{gateway_id}-{device_id}"}``.
Each device gets an endpoint (``endpoint.Endpoint``: own UDP socket, registration, objects
/0 /1 /3 /5) that an LwM2M server drives through the Firmware Update object (/5):

* PULL: the server writes a Package URI (http/https through ``gateway.download``: resume,
  size cap, TLS; coap: block-wise GET streamed to a file);
* PUSH: the server writes the Package (/5/0/0) by Block1, streamed to a file, size-capped;
* an empty Package URI or Package cancels, in any state (``canceled()`` stops a running
  update the way the other backends' cancels do).

How the server's word maps onto the engine (the trust rule): a package is offered as
``install: check-only`` - the gateway runs every pre-flight check of the image (signature
(a), the device's hardware, slot, version, mode (b)/(c)) and sends nothing; only when they
pass does State become 2 Downloaded. The server's Update (/5/0/2, State 2 only) then offers
the same package for the normal flow: upload, test boot, health check and confirm are the
engine's, exactly as for any other source. PkgName/PkgVersion are what the client reports of
the package (the image header's version, for display); nothing the server sends decides
anything but *whether* to start that flow, or to stop it.

Offers carry ``report_to = {"endpoint", "gen"}``: ``gen`` numbers the packages the server
gave the endpoint, so reports about an older package (replaced or canceled) change nothing.
The /5 state is persisted in ``<state_dir>/lwm2m/`` and re-notified after re-registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from gateway.artifacts.bundle import may_be_bundle, set_cap
from gateway.download import Downloader, DownloadTimeouts, sha256_file
from gateway.sources.base import (
    CHECK_ONLY,
    PREFLIGHT_PASSED,
    DeviceView,
    FetchError,
    FleetSource,
    Offer,
    Report,
    ServerCanceled,
    UpdateResult,
    UpdateState,
)
from gateway.sources.lwm2m.endpoint import Endpoint
from gateway.sources.lwm2m.firmware import DOWNLOADED, IDLE
from gateway.sources.settings import Lwm2mSourceConfig

log = logging.getLogger("gateway.sources.lwm2m")

COAP_BLOCK_SZX = 6  # 1024-byte blocks for a coap:// Package URI
COAP_MAX_BLOCKS = 1 << 20


class Lwm2mSource(FleetSource):
    name = "lwm2m"

    def __init__(self, cfg: Lwm2mSourceConfig, state_dir: Path, gateway_id: str = "smp-gateway",
                 devices: Iterable[tuple[str, str | None]] = ()) -> None:
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.gateway_id = gateway_id
        self._devices = dict(devices)  # id -> group: endpoints registered at start()
        self._eps: dict[str, Endpoint] = {}  # device id -> endpoint
        self._by_name: dict[str, Endpoint] = {}
        self._waker: Callable[[str], None] | None = None
        self._reboot: Callable[[str], Awaitable[str | None]] | None = None
        self._downloader = Downloader(
            self.state_dir, ca_file=cfg.ca_file, insecure=cfg.insecure,
            timeouts=DownloadTimeouts(connect_s=cfg.download_connect_timeout_s,
                                      read_s=cfg.download_read_timeout_s),
            retries=cfg.download_retries)
        # a pulled package waits in State 2 for the server's Update, days if need be: never pruned
        self._downloader.keep = lambda: [Path(ep.rec.package) for ep in self._eps.values()
                                         if ep.rec.package]
        self._started = False
        self._closing: set[asyncio.Task[None]] = set()  # endpoints of gone devices, closing

    # -- hooks the gateway sets --------------------------------------------------------------
    def set_waker(self, wake: Callable[[str], None]) -> None:
        """``wake(device_id)``: the device's next check now (a package, an Update)."""
        self._waker = wake

    def set_reboot(self, reboot: Callable[[str], Awaitable[str | None]]) -> None:
        """``reboot(device_id)`` -> None when reset, else why not: /3/0/4 Reboot."""
        self._reboot = reboot
        for ep in self._eps.values():
            ep.reboot = reboot

    # -- endpoints ---------------------------------------------------------------------------
    def endpoint_name(self, device_id: str, group: str | None = None) -> str:
        return self.cfg.endpoint.format(device_id=device_id, gateway_id=self.gateway_id,
                                        group=group or "")

    def endpoint(self, device_id: str) -> Endpoint | None:
        return self._eps.get(device_id)

    async def _endpoint(self, device_id: str, group: str | None = None) -> Endpoint:
        ep = self._eps.get(device_id)
        if ep is None:
            name = self.endpoint_name(device_id, group)
            ep = Endpoint(self.cfg, device_id, name, self.state_dir, self._changed, self._reboot,
                          gateway_id=self.gateway_id)
            self._eps[device_id] = ep
            self._by_name[name] = ep
            await ep.start()
        return ep

    def device_gone(self, device_id: str) -> None:
        """Discovery lost the device: its endpoint deregisters (bounded: 2 s) and its socket
        closes. Its /5 record stays in the state directory: found again, the device gets its
        endpoint back at its next check, registering with the same State/Result."""
        ep = self._eps.pop(device_id, None)
        if ep is None:
            return
        self._by_name.pop(ep.name, None)
        log.info("lwm2m ep=%s device=%s gone: deregistering", ep.name, device_id)
        task = asyncio.get_running_loop().create_task(ep.close(), name=f"lwm2m-{ep.name}-gone")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _changed(self, ep: Endpoint, phase: str) -> None:
        # a cancel (empty Package URI / Package) too: a running update's cancel probe now
        if (phase in ("fetch", "check", "install") or ep.rec.canceled) and self._waker is not None:
            self._waker(ep.device_id)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for dev_id, group in self._devices.items():
            await self._endpoint(dev_id, group)

    async def close(self) -> None:
        eps = list(self._eps.values())
        self._eps.clear()
        self._by_name.clear()
        self._started = False
        await asyncio.gather(*(ep.close() for ep in eps), *self._closing, return_exceptions=True)
        await self._downloader.close()

    def poll_interval(self) -> float:
        return self.cfg.poll_interval_s

    # -- FleetSource ---------------------------------------------------------------------------
    async def check(self, device: DeviceView) -> Offer | None:
        ep = await self._endpoint(device.id, device.group)
        if device.running_version is not None:
            ep.set(running_version=str(device.running_version))  # (b): what the device reports
        rec = ep.rec
        report_to = {"endpoint": ep.name, "gen": rec.gen}
        if rec.canceled and rec.phase == "idle":
            # the server's cancel of a package no engine run is holding (Downloading,
            # Downloaded): journalled as an intent and taken back by the gateway like every
            # other source's cancel (``FleetOps.server_cancel``); ``acknowledge_cancel`` closes it
            raise ServerCanceled(rec.canceled, self._cancel_offer(device.id, ep), report_to)
        if rec.phase == "fetch":
            art = "lwm2m-uri-" + hashlib.sha256(rec.uri.encode()).hexdigest()[:32]
            return Offer(device.id, self.name, art, handle={"uri": rec.uri, "gen": rec.gen},
                         report_to=report_to, install=CHECK_ONLY)
        if rec.phase in ("check", "install") and rec.package and Path(rec.package).is_file():
            art = "sha256:" + sha256_file(Path(rec.package))
            return Offer(device.id, self.name, art, handle={"path": rec.package, "gen": rec.gen},
                         report_to=report_to,
                         install=CHECK_ONLY if rec.phase == "check" else "forced")
        if rec.phase in ("check", "install"):  # its file is gone (state directory cleaned)
            ep.set(state=IDLE, result=int(UpdateResult.CONNECTION_LOST), phase="idle",
                   detail="the package file is gone from the state directory")
        return None

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        h = offer.handle or {}
        if "path" in h:
            path = Path(h["path"])
            if not path.is_file():
                raise FetchError(f"package file {path} is gone", UpdateResult.CONNECTION_LOST)
            cap = set_cap(max_size) if _is_zip(path) else max_size
            if cap is not None and path.stat().st_size > cap:
                raise FetchError(f"package is {path.stat().st_size} bytes, more than the {cap} "
                                 "the device's slot holds", UpdateResult.NOT_ENOUGH_FLASH,
                                 permanent=True)
            return path
        uri = str(h["uri"])
        ep = self._eps.get(offer.device_id)
        cap = min(self.cfg.max_package_bytes, max_size or self.cfg.max_package_bytes)
        if may_be_bundle(urlsplit(uri).path):
            cap = min(self.cfg.max_package_bytes, set_cap(max_size) or self.cfg.max_package_bytes)
        scheme = urlsplit(uri).scheme.lower()
        if scheme not in ("http", "https", "coap"):
            raise FetchError(f"unsupported protocol {scheme!r}", UpdateResult.UNSUPPORTED_PROTOCOL)
        if ep is None:
            raise FetchError("no endpoint for the device", UpdateResult.CONNECTION_LOST)
        if scheme == "coap":
            dl: asyncio.Future[Path] = asyncio.ensure_future(self._coap_get(ep, uri, cap))
        else:
            dl = asyncio.ensure_future(self._downloader.fetch(uri, sha256=None, max_size=cap))
        # the server's cancel (empty Package URI / Package) stops the download at once: no
        # waiting out a slow server; the gateway journals and finishes it (ServerCanceled)
        stop = asyncio.ensure_future(ep.cancel_seen.wait())
        race: set[asyncio.Future[Any]] = {dl, stop}
        try:
            await asyncio.wait(race, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not dl.done():
                dl.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await dl
        if ep.rec.gen == h.get("gen") and ep.rec.canceled:
            raise ServerCanceled(f"{ep.rec.canceled} during the download",
                                 self._cancel_offer(offer.device_id, ep),
                                 {"endpoint": ep.name, "gen": ep.rec.gen})
        path = dl.result()
        if ep.rec.gen == h.get("gen"):
            ep.set(package=str(path))
        return path

    async def _coap_get(self, ep: Endpoint, uri: str, cap: int) -> Path:
        """A coap:// Package URI, Block2 by Block2 into a file. Bounded: the size cap, the
        number of blocks, ``request_timeout_s`` per block and ``coap_pull_timeout_s`` for the
        whole transfer. Each block must be the one at the file's current end (its number and
        size, RFC 7959: a server may choose a smaller block size, never a larger one); anything
        else stops the transfer before its bytes are written."""
        ctx, own = ep.ctx, False
        if ep.secure:  # the endpoint's context speaks DTLS to its server only
            ctx, own = await aiocoap.Context.create_client_context(transports=["udp6"]), True
        assert ctx is not None
        dest = self.state_dir / "downloads" / ("coap-" + hashlib.sha256(uri.encode()).hexdigest())
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        part = dest.with_suffix(".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        size, szx = 0, COAP_BLOCK_SZX
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.coap_pull_timeout_s
        try:
            for _ in range(COAP_MAX_BLOCKS):
                num = size >> (szx + 4)
                req = aiocoap.Message(code=Code.GET, uri=uri,
                                      block2=BlockOption.BlockwiseTuple(num, False, szx))
                left = deadline - loop.time()
                late = FetchError(f"coap GET {uri}: not done within coap_pull_timeout_s "
                                  f"({self.cfg.coap_pull_timeout_s:g}s, {size} bytes)",
                                  UpdateResult.CONNECTION_LOST)
                if left <= 0:
                    raise late
                try:
                    resp = await asyncio.wait_for(ctx.request(req, handle_blockwise=False).response,
                                                  min(self.cfg.request_timeout_s, left))
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise late from None
                    raise FetchError(f"coap GET {uri}: no answer within request_timeout_s",
                                     UpdateResult.CONNECTION_LOST) from None
                except aiocoap.error.Error as exc:
                    raise FetchError(f"coap GET {uri}: {type(exc).__name__}: {exc}",
                                     UpdateResult.CONNECTION_LOST) from None
                if resp.code == Code.NOT_FOUND:
                    raise FetchError(f"coap GET {uri}: 4.04", UpdateResult.INVALID_URI)
                if not resp.code.is_successful():
                    raise FetchError(f"coap GET {uri}: {resp.code}", UpdateResult.CONNECTION_LOST)
                b2 = resp.opt.block2
                if b2 is None and size:
                    raise FetchError(f"coap GET {uri}: an answer without Block2 after {size} "
                                     "bytes", UpdateResult.CONNECTION_LOST)
                if b2 is not None:
                    bsize = 1 << (b2.size_exponent + 4)
                    if (b2.size_exponent > szx or b2.block_number * bsize != size
                            or len(resp.payload) > bsize
                            or (b2.more and len(resp.payload) != bsize)):
                        raise FetchError(f"coap GET {uri}: block {b2.block_number} of "
                                         f"{bsize} bytes ({len(resp.payload)} sent) does not "
                                         f"continue the {size} bytes so far",
                                         UpdateResult.CONNECTION_LOST)
                    szx = b2.size_exponent
                if size + len(resp.payload) > cap:
                    raise FetchError(f"package larger than {cap} bytes", UpdateResult.NOT_ENOUGH_FLASH)
                os.write(fd, resp.payload)
                size += len(resp.payload)
                if b2 is None or not b2.more:
                    break
            else:
                raise FetchError(f"coap GET {uri}: more than {COAP_MAX_BLOCKS} blocks",
                                 UpdateResult.NOT_ENOUGH_FLASH)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        finally:
            if own:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ctx.shutdown(), 5.0)
        os.close(fd)
        os.replace(part, dest)
        return dest

    def _ep_for(self, offer: Offer) -> Endpoint | None:
        name = offer.report_to.get("endpoint")
        ep = self._by_name.get(str(name)) if name is not None else None
        return ep or self._eps.get(offer.device_id)

    async def report(self, offer: Offer, report: Report) -> None:
        ep = self._ep_for(offer)
        if ep is None:
            # after a restart the endpoints come up at start(); a device not configured (a
            # discovered one) gets its endpoint at its first check
            ep = await self._endpoint(offer.device_id)
        rec = ep.rec
        if offer.report_to.get("gen") != rec.gen or rec.canceled:
            # a package the server replaced or canceled: its outcome changes nothing (taken)
            log.info("lwm2m ep=%s report about an earlier package (gen %s, now %d) dropped: %s",
                     ep.name, offer.report_to.get("gen"), rec.gen, report.result.name)
            return
        if report.finished:
            changes: dict[str, object] = {"state": IDLE, "result": int(report.result),
                                          "phase": "idle", "detail": report.detail[:300]}
            if report.result == UpdateResult.SUCCESS and rec.pkg_version:
                # the engine saw the device run this very image (hash), confirmed (b)
                changes["running_version"] = rec.pkg_version
            ep.set(**changes)
            if rec.package and Path(rec.package) == ep.push_file:
                ep.push_file.unlink(missing_ok=True)
            self._drop_download(ep)
            return
        if report.state == UpdateState.DOWNLOADED and report.detail == PREFLIGHT_PASSED \
                and rec.phase in ("fetch", "check"):
            name, version = _describe(Path(rec.package) if rec.package else None, rec.uri)
            ep.set(state=DOWNLOADED, phase="wait", pkg_name=name, pkg_version=version,
                   detail="")
        # Downloading/Updating are set by the server's own writes and executes; the engine's
        # progress reports change no state

    async def canceled(self, offer: Offer) -> str | None:
        ep = self._ep_for(offer)
        if ep is None:
            return None
        rec = ep.rec
        if offer.report_to.get("gen") != rec.gen:
            return "the LwM2M server gave another package"
        return rec.canceled

    async def acknowledge_cancel(self, offer: Offer, done: bool, detail: str) -> None:
        # LwM2M has no cancel acknowledgement: State/Result (0/0) already say it. The gateway
        # finished the cancel (journal): the endpoint stops asking for it.
        ep = self._ep_for(offer)
        if ep is not None and offer.report_to.get("gen") == ep.rec.gen and ep.rec.canceled:
            rec = ep.rec
            if not done and rec.canceled_pkg is not None:
                # too late: the take-back read the device running the canceled package's image,
                # confirmed (b) - the update happened. The server reads that truth, not the
                # cancel's 0/0: Result 1, the package's name/version, /3/0/3 its version (the
                # engine's final report, dropped while the cancel was open, said no more)
                name, version = [*rec.canceled_pkg, "", ""][:2]
                changes: dict[str, object] = {
                    "state": IDLE, "phase": "idle", "result": int(UpdateResult.SUCCESS),
                    "pkg_name": name, "pkg_version": version,
                    "detail": f"installed and confirmed before the cancel: {detail}"[:300]}
                if version:
                    changes["running_version"] = version
                ep.set(**changes)
            ep.set(canceled=None, canceled_pkg=None)
            self._drop_download(ep)
        log.info("lwm2m device=%s update canceled by the server: %s", offer.device_id, detail)

    def _drop_download(self, ep: Endpoint) -> None:
        """A pulled package's file, once its outcome is reported (or its cancel finished): the
        gateway's image store holds what it verified, so nothing of the download is needed -
        unless another endpoint holds the same file (one URL, de-duplicated downloads)."""
        pkg = ep.rec.package
        if not pkg or Path(pkg).parent != self.state_dir / "downloads":
            return
        ep.set(package=None)
        if not any(o.rec.package == pkg for o in self._eps.values()):
            Path(pkg).unlink(missing_ok=True)

    def _cancel_offer(self, device_id: str, ep: Endpoint) -> Offer:
        """The canceled package as an offer: enough to journal the cancel and find the
        endpoint again (its report handle), also after a restart."""
        return Offer(device_id, self.name, f"lwm2m-{ep.name}-gen-{ep.rec.gen}",
                     report_to={"endpoint": ep.name, "gen": ep.rec.gen})


def _is_zip(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
    return False


def _describe(path: Path | None, uri: str) -> tuple[str, str]:
    """PkgName / PkgVersion the client reports: the file's name and the MCUboot header's
    version (display only - the gateway decides nothing on them)."""
    name = PurePosixPath(urlsplit(uri).path).name if uri else ""
    version = ""
    if path is not None:
        name = name or f"image-{sha256_file(path)[:12]}"
        with contextlib.suppress(OSError), open(path, "rb") as f:
            head = f.read(28)
        if len(head) == 28 and struct.unpack_from("<I", head, 0)[0] == 0x96F3B83D:
            major, minor, rev, build = struct.unpack_from("<BBHI", head, 20)
            version = f"{major}.{minor}.{rev}" + (f"+{build}" if build else "")
    return name[:64], version[:32]
