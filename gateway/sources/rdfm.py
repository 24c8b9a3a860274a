"""RDFM (antmicro/rdfm) fleet source: the device API exactly as RDFM's server implements it.

Owns the RDFM side of each MCU: its RSA device key (generated on first use, kept 0600 in
``<state_dir>/rdfm/keys`` or ``device_key_dir``), authentication, update checks, artifact
download and unpacking. Checked against the server sources (``server/src/api/v1/auth.py``,
``update.py``, ``middleware.py``, ``logs.py``, ``server/src/auth/device.py``) and the Go
``devices/mcumgr-client`` (``rdfm/client.go``, ``agent/device/key.go``, ``rdfm/artifact``):

- ``POST /api/v1/auth/device`` body ``{"metadata": {...}, "public_key": PEM, "timestamp": unix}``
  with ``X-RDFM-Device-Signature`` = base64 RSA PKCS#1 v1.5 / SHA-256 over the exact body bytes.
  401 = not accepted by an administrator yet (the server records a pending registration);
  200 ``{"token": jwt, "expires": seconds}`` (HS256, 300 s: ``created_at + expires``).
- ``POST /api/v1/update/check``, ``Authorization: Bearer token=<jwt>``, body = the metadata
  object itself (``rdfm.hardware.devtype``, ``rdfm.software.version``,
  ``rdfm.hardware.macaddr``) → 200 ``{id, created, sha256, uri}`` / 204 / 401 (token expired).
- ``uri`` is a pre-signed link (1 h); the file is a Mender-format ``zephyr-image`` artifact
  (see ``gateway.artifacts.mender``) whose ``sha256`` the check response gives.

Metadata: the server stores a device's metadata when it authenticates, so a check whose
metadata (running version, ``smp-gateway.*`` inventory) differs from what the current token
was obtained with authenticates again first; the server learns a new version at the next
check, not at token expiry. An artifact whose bytes match the check answer's sha256 but cannot
be unpacked is a permanent ``FetchError``: the gateway blocks it and reports it once.

Reporting: RDFM's device API has no deployment-status endpoint. The server learns the outcome
from the next update check (``rdfm.software.version`` is the version actually running, so a
success shows as the new version and a rollback as the old one) and, on servers that have it,
from device logs: ``POST /api/v1/logs`` (device token) with ``{"batch": [{"device_timestamp",
"name", "entry"}]}``. ``report()`` sends state changes and outcomes there (name
``smp-gateway.update``, entry = JSON with the LwM2M state/result); a 404/405 (older server)
turns that off with one log line.

Report handle (``Offer.report_to``): ``{"ident", "metadata", "package_id"}`` - the RDFM device
identity and the three metadata keys it authenticates with (its key is on disk under
``device_key_dir``; the ``smp-gateway.*`` inventory keys are left out: they change between checks),
so a final outcome can be logged after a restart. A log upload that does not get a 200 (server
down, 5xx, the device no longer accepted) raises ``ReportNotDelivered`` and is retried. The log
API appends: each entry carries ``report_id`` (the gateway's journal id of the report) so that
a reader can drop the duplicate a retry makes when an answer was lost.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.artifacts.bundle import set_cap
from gateway.artifacts.mender import ArtifactError, ArtifactIntegrityError, unpack_zephyr_artifact
from gateway.inventory import rdfm_metadata
from gateway.sources._http import HttpSource, read_json, read_text
from gateway.sources.base import (
    DeviceView,
    FetchError,
    NotReadOnly,
    NotYetAccepted,
    Offer,
    Report,
    ReportNotDelivered,
    ReportRefused,
    UpdateResult,
    peeking,
)
from gateway.sources.settings import RdfmSourceConfig

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-RDFM-Device-Signature"
META_DEVTYPE = "rdfm.hardware.devtype"
META_SOFTVER = "rdfm.software.version"
META_MAC = "rdfm.hardware.macaddr"
ARTIFACT_OVERHEAD = 256 * 1024  # tar headers + metadata around the image


@dataclass
class _Token:
    value: str
    valid_until: float  # time.monotonic()


class RdfmSource(HttpSource):
    server_label = "RDFM server"
    name = "rdfm"
    # peek: the device API's update check (a query); authenticating a device that has a key
    # here sends its current metadata, one without a key is not registered (NotReadOnly)
    peekable = True

    def __init__(self, cfg: RdfmSourceConfig, state_dir: Path) -> None:
        super().__init__(cfg, cfg.url, state_dir)
        self.cfg = cfg
        self.key_dir = cfg.device_key_dir or self.state_dir / "rdfm" / "keys"
        self.image_dir = self.state_dir / "rdfm" / "images"
        self._keys: dict[str, rsa.RSAPrivateKey] = {}
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._tokens: dict[str, _Token] = {}
        self._auth_locks: dict[str, asyncio.Lock] = {}
        self._waiting: set[str] = set()
        self._logs_supported = cfg.report_logs
        self.clock = time.monotonic  # for token lifetimes
        # the metadata each identity last authenticated with: RDFM stores a device's metadata
        # at authentication only, so a change (a new running version after an update, the
        # inventory) is sent by authenticating again at the next check, not at token expiry
        self._auth_meta: dict[str, dict[str, str]] = {}
        self._last_reported: dict[tuple[str, str], tuple[int, int]] = {}
        # devices offered the same artifact unpack it one at a time: the unpacker writes
        # ``<image sha256>.img`` through one temporary name
        self._unpack_locks: dict[str, asyncio.Lock] = {}

    # -- lifecycle -----------------------------------------------------------------------
    async def _http(self) -> aiohttp.ClientSession:
        await self.start()
        assert self._session is not None
        return self._session

    def poll_interval(self) -> float:
        return self.cfg.poll_interval_s

    # -- identity and keys ---------------------------------------------------------------
    def identity(self, device: DeviceView) -> str:
        if self.cfg.identity == "group" and device.group:
            return device.group
        return device.id

    def metadata(self, device: DeviceView) -> dict[str, str]:
        version = device.running_version.semver() if device.running_version else "0.0.0"
        return {
            META_DEVTYPE: self.cfg.device_type or device.hardware,
            META_SOFTVER: version,
            META_MAC: self.identity(device),
        } | self._inventory_metadata(device)

    def _inventory_metadata(self, device: DeviceView) -> dict[str, str]:
        """``smp-gateway.*`` keys from the inventory (one RDFM device per MCU only): string
        values, as the real server requires; the three keys above stay as they are."""
        if not device.inventory or self.cfg.identity != "device":
            return {}

        return rdfm_metadata(device.inventory)

    def key_path(self, ident: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "._-@" else "_" for c in ident)
        return self.key_dir / f"{safe}.pem"

    async def device_key(self, ident: str) -> rsa.RSAPrivateKey:
        if ident in self._keys:
            return self._keys[ident]
        lock = self._key_locks.setdefault(ident, asyncio.Lock())
        async with lock:
            if ident not in self._keys:
                self._keys[ident] = await asyncio.to_thread(self._load_or_create_key, ident)
        return self._keys[ident]

    def _load_or_create_key(self, ident: str) -> rsa.RSAPrivateKey:
        path = self.key_path(ident)
        if path.exists():
            if path.stat().st_mode & 0o077:
                log.warning("RDFM device key %s is readable by other users; fixing to 0600", path)
                os.chmod(path, 0o600)
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise FetchError(f"{path} is not an RSA private key", UpdateResult.UPDATE_FAILED)
            return key
        log.info("generating a %d-bit RSA device key for %s at %s", self.cfg.key_bits, ident, path)
        key = rsa.generate_private_key(public_exponent=65537, key_size=self.cfg.key_bits)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
        return key

    @staticmethod
    def public_pem(key: rsa.RSAPrivateKey) -> str:
        return (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    # -- authentication ------------------------------------------------------------------
    async def _token(self, meta: dict[str, str], force: bool = False,
                     current: bool = True) -> str | None:
        """A device token for the identity ``meta[rdfm.hardware.macaddr]`` (None: not accepted).

        ``current``: ``meta`` is the device's metadata now (an update check): when it differs
        from what the token was obtained with, authenticate again so the server stores it
        (a log upload passes False: its handle carries the metadata of the offer's time)."""
        ident = meta[META_MAC]
        lock = self._auth_locks.setdefault(ident, asyncio.Lock())
        async with lock:
            tok = self._tokens.get(ident)
            sent = self._auth_meta.get(ident)
            changed = current and sent is not None and sent != meta
            if changed and tok is not None:
                diff = sorted(k for k in set(meta) | set(sent or {})
                              if meta.get(k) != (sent or {}).get(k))
                log.info("RDFM metadata of %s changed (%s; %s now %s): authenticating again so "
                         "the server stores it", ident, ", ".join(diff[:5]), META_SOFTVER,
                         meta.get(META_SOFTVER))
            if tok is not None and not force and not changed and self.clock() < tok.valid_until:
                return tok.value
            self._tokens.pop(ident, None)
            return await self._authenticate(meta, ident)

    async def _authenticate(self, meta: dict[str, str], ident: str) -> str | None:
        if peeking() and ident not in self._keys and not self.key_path(ident).exists():
            raise NotReadOnly(f"RDFM device {ident} has no key here: asking would register it "
                              f"with {self.base}")
        key = await self.device_key(ident)
        body = json.dumps(
            {
                "metadata": meta,
                "public_key": self.public_pem(key),
                "timestamp": int(time.time()),
            }
        ).encode()
        signature = key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            SIGNATURE_HEADER: base64.b64encode(signature).decode(),
        }
        session = await self._http()
        try:
            async with session.post(f"{self.base}/api/v1/auth/device", data=body, headers=headers) as r:
                if r.status == 401:
                    if ident not in self._waiting:
                        log.warning("device %s waiting for acceptance on the RDFM server %s "
                                    "(accept its registration there)", ident, self.base)
                        self._waiting.add(ident)
                    else:
                        log.debug("device %s still waiting for acceptance on the RDFM server", ident)
                    return None
                if r.status != 200:
                    text = await read_text(r)
                    raise FetchError(
                        f"RDFM authentication of {ident} failed: HTTP {r.status} {text}",
                        UpdateResult.CONNECTION_LOST,
                    )
                data = await read_json(r, "RDFM authentication")  # bounded in bytes
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"RDFM server unreachable: {exc}", UpdateResult.CONNECTION_LOST) from None
        token = data.get("token") if isinstance(data, dict) else None
        expires = data.get("expires") if isinstance(data, dict) else None
        if not isinstance(token, str) or not isinstance(expires, int | float):
            raise FetchError("RDFM authentication answer lacks token/expires", UpdateResult.CONNECTION_LOST)
        if ident in self._waiting:
            log.info("device %s was accepted by the RDFM server", ident)
            self._waiting.discard(ident)
        self._auth_meta[ident] = dict(meta)
        margin = min(self.cfg.token_margin_s, float(expires) / 2)
        self._tokens[ident] = _Token(token, self.clock() + float(expires) - margin)
        log.debug("RDFM token for %s valid for %ss", ident, expires)
        return token

    # -- FleetSource -----------------------------------------------------------------------
    async def check(self, device: DeviceView) -> Offer | None:
        meta = self.metadata(device)
        for attempt in range(2):
            token = await self._token(meta, force=attempt > 0)
            if token is None:  # no offer is not "up to date": nobody has looked yet
                raise NotYetAccepted(f"RDFM device {meta[META_MAC]} is not accepted by the server "
                                     f"{self.base} yet: accept its registration there")
            status, data = await self._post_json("/api/v1/update/check", meta, token)
            if status == 401:
                log.info("RDFM token for %s rejected; authenticating again", meta[META_MAC])
                continue
            if status == 204:
                return None
            if status != 200 or not isinstance(data, dict):
                raise FetchError(f"RDFM update check answered HTTP {status}", UpdateResult.CONNECTION_LOST)
            sha = data.get("sha256")
            uri = data.get("uri")
            if not isinstance(uri, str) or not isinstance(sha, str):
                raise FetchError("RDFM update check answer lacks uri/sha256", UpdateResult.INVALID_URI)
            return Offer(
                device_id=device.id,
                source=self.name,
                artifact_id=f"rdfm-{sha.lower()}",
                sha256=sha.lower(),
                handle={
                    "uri": uri,
                    "package_id": data.get("id"),
                    "ident": meta[META_MAC],
                    "device_type": meta[META_DEVTYPE],
                    "device": device,
                },
                # the three keys the device API requires: stable for one offer (the inventory
                # keys change at every check and would make each check a different handle)
                report_to={"ident": meta[META_MAC], "package_id": data.get("id"),
                           "metadata": {k: meta[k] for k in (META_DEVTYPE, META_SOFTVER, META_MAC)}},
            )
        raise FetchError("RDFM rejected a freshly issued token", UpdateResult.CONNECTION_LOST)

    async def _post_json(self, path: str, payload: Any, token: str) -> tuple[int, Any]:
        session = await self._http()
        headers = {"Authorization": f"Bearer token={token}", "Accept": "application/json"}
        try:
            async with session.post(f"{self.base}{path}", json=payload, headers=headers) as r:
                data = None
                if r.status == 200:  # bounded in bytes; an unreadable answer: FetchError
                    data = await read_json(r, f"RDFM {path}")
                return r.status, data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"RDFM request {path} failed: {exc}", UpdateResult.CONNECTION_LOST) from None

    async def canceled(self, offer: Offer) -> str | None:
        """RDFM has no cancel: the package assigned to the device changed (another one, or none)
        while this one is being installed. Asked with the offer's own metadata."""
        h = offer.handle if isinstance(offer.handle, dict) else {}
        device = h.get("device")
        if not isinstance(device, DeviceView):
            return None
        try:
            now = await self.check(device)
        except (FetchError, NotYetAccepted):
            return None  # server unreachable: not a cancel
        if now is None:
            return f"RDFM no longer assigns {offer.artifact_id} to {self.identity(device)}"
        if now.sha256 != offer.sha256:
            return f"RDFM target of {self.identity(device)} changed to {now.artifact_id}"
        return None

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        h = offer.handle
        # the payload may be an image set (dfu_application.zip): the unpacker and the image
        # store check each image against its slot
        cap = None if max_size is None else (set_cap(max_size) or 0) + ARTIFACT_OVERHEAD
        artifact = await self._downloader.fetch(h["uri"], sha256=offer.sha256, max_size=cap)
        lock = self._unpack_locks.setdefault(offer.artifact_id, asyncio.Lock())
        try:
            async with lock:
                art = await asyncio.to_thread(
                    unpack_zephyr_artifact,
                    artifact,
                    self.image_dir,
                    device_type=h["device_type"],
                    max_image_size=max_size,
                )
        # the downloader checked the file against the check answer's sha256: these are the very
        # bytes the server offers, so an artifact that cannot be unpacked (truncated, malformed)
        # never will be: permanent, the gateway blocks it (keyed by that sha256) and reports once
        except ArtifactIntegrityError as exc:
            artifact.unlink(missing_ok=True)
            raise FetchError(f"RDFM artifact {offer.artifact_id} rejected: {exc}",
                             UpdateResult.INTEGRITY_FAILURE, permanent=True) from None
        except ArtifactError as exc:
            raise FetchError(f"RDFM artifact {offer.artifact_id} rejected: {exc}",
                             UpdateResult.UNSUPPORTED_PACKAGE, permanent=True) from None
        log.info(
            "RDFM artifact %s for %s: %s version %s",
            offer.artifact_id,
            offer.device_id,
            art.name,
            art.version,
        )
        return art.image

    async def report(self, offer: Offer, report: Report) -> None:
        key = (offer.device_id, offer.artifact_id)
        sig = (int(report.state), int(report.result))
        if not report.finished and self._last_reported.get(key) == sig:
            return  # progress ticks: RDFM logs are for state changes and outcomes only
        log.info(
            "RDFM update of %s (%s): state %s result %s %s",
            offer.device_id,
            offer.artifact_id,
            report.state.name,
            report.result.name,
            report.detail,
        )
        if not self._logs_supported:
            return  # no report channel: the next update check carries the running version
        meta = offer.report_to.get("metadata")
        if not isinstance(meta, dict) or not all(
                isinstance(meta.get(k), str) for k in (META_DEVTYPE, META_SOFTVER, META_MAC)):
            raise ReportRefused(f"RDFM report handle of {offer.device_id} lacks the device metadata")
        entry: dict[str, Any] = {
            "device": offer.device_id,
            "artifact": offer.artifact_id,
            "state": int(report.state),
            "state_name": report.state.name,
            "result": int(report.result),
            "result_name": report.result.name,
            "detail": report.detail,
        }
        if report.report_id is not None:
            entry["report_id"] = report.report_id
        batch = {
            "batch": [
                {
                    "device_timestamp": email.utils.formatdate(usegmt=True),
                    "name": "smp-gateway.update",
                    "entry": json.dumps(entry),
                }
            ]
        }
        try:
            status = 401
            for attempt in range(2):
                token = await self._token(dict(meta), force=attempt > 0, current=False)
                if token is None:
                    raise ReportNotDelivered(
                        f"RDFM device {meta[META_MAC]} is not accepted by the server: outcome not logged")
                status, _ = await self._post_json("/api/v1/logs", batch, token)
                if status != 401:
                    break
        except FetchError as exc:
            raise ReportNotDelivered(f"could not send the outcome to RDFM: {exc}") from None
        if status in (404, 405):
            log.info("RDFM server has no device log API (HTTP %d); outcomes are logged locally only",
                     status)
            self._logs_supported = False
            return
        if status != 200:
            raise ReportNotDelivered(f"RDFM log upload answered HTTP {status}")
        if report.finished:
            self._last_reported.pop(key, None)
        else:
            self._last_reported[key] = sig
