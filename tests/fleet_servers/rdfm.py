"""A loopback RDFM server implementing the device API as antmicro/rdfm's server does.

Mirrors ``server/src/api/v1/auth.py`` (signed registration, 401 until an administrator
accepts the device, HS256 JWT ``{device_id, created_at, expires}``), ``middleware.device_api``
(``Authorization: Bearer token=<jwt>``), ``update.py`` (metadata body, 200/204/400/401) and
``logs.py`` (``POST /api/v1/logs``), with packages served from ``/local_storage/<uuid>``.

``logs`` holds every log entry the server accepted. ``outage``: an HTTP status every device API
request gets while it is set (a server that is down behind its proxy; ``outage_hits`` counts
them). Fault knob ``outcome_faults`` for the next
log uploads that carry an outcome (an ``smp-gateway.update`` entry with a result): an HTTP status
answers that instead of storing the batch; ``"drop"`` stores it and drops the connection
without an answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .common import FileStore

META = ("rdfm.hardware.devtype", "rdfm.software.version", "rdfm.hardware.macaddr")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Package:
    uuid: str
    sha256: str
    version: str
    devtype: str
    id: int


@dataclass
class RdfmServer:
    token_expiry: int = 300
    secret: bytes = b"test-jwt-secret"
    devices: dict[str, str] = field(default_factory=dict)  # mac -> accepted public key
    registrations: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    assigned: dict[str, Package] = field(default_factory=dict)  # mac -> package
    auth_requests: list[dict[str, Any]] = field(default_factory=list)
    checks: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (status, body)
    logs: list[dict[str, Any]] = field(default_factory=list)
    files: FileStore = field(default_factory=lambda: FileStore(prefix="/local_storage"))
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)  # tokens treated as expired
    outcome_faults: list[int | str] = field(default_factory=list)
    outage: int | None = None
    outage_hits: list[str] = field(default_factory=list)  # paths asked during the outage
    _next_id: int = 1

    @web.middleware
    async def _outage(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.outage is not None and request.path.startswith("/api/"):
            self.outage_hits.append(request.path)
            return web.json_response({"error": "service unavailable"}, status=self.outage)
        resp: web.StreamResponse = await handler(request)
        return resp

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._outage])
        app.router.add_post("/api/v1/auth/device", self.auth_device)
        app.router.add_post("/api/v1/update/check", self.update_check)
        app.router.add_post("/api/v1/logs", self.logs_create)
        self.files.routes(app)
        return app

    # -- admin side ----------------------------------------------------------------------
    def accept(self, mac: str) -> None:
        for m, key in list(self.registrations):
            if m == mac:
                self.devices[mac] = key
                del self.registrations[(m, key)]
                return
        raise KeyError(f"no pending registration for {mac}")

    def assign(self, mac: str, artifact: bytes, version: str, devtype: str) -> Package:
        name = str(uuid.uuid4())
        self.files.add(name, artifact)
        pkg = Package(name, hashlib.sha256(artifact).hexdigest(), version, devtype, self._next_id)
        self._next_id += 1
        self.assigned[mac] = pkg
        return pkg

    def expire_tokens(self) -> None:
        """Every token issued so far is now past ``created_at + expires``."""
        self.revoked.update(self.issued)

    # -- JWT (HS256, as PyJWT encodes it) ------------------------------------------------
    def _jwt(self, claims: dict[str, Any]) -> str:
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps(claims).encode())
        sig = hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(sig)}"

    def _verify(self, token: str) -> dict[str, Any] | None:
        try:
            header, payload, sig = token.split(".")
            want = hmac.new(self.secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(want, _unb64url(sig)):
                return None
            claims: dict[str, Any] = json.loads(_unb64url(payload))
        except (ValueError, KeyError):
            return None
        now = time.time()
        if now >= claims["created_at"] + claims["expires"] or token in self.revoked:
            return None
        return claims

    def _device_token(self, request: web.Request) -> dict[str, Any] | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, params = auth.partition(" ")
        if scheme.lower() != "bearer" or not params.startswith("token="):
            return None
        return self._verify(params[len("token=") :])

    # -- device API ----------------------------------------------------------------------
    async def auth_device(self, request: web.Request) -> web.Response:
        body = await request.read()
        sig = request.headers.get("X-RDFM-Device-Signature")
        if sig is None:
            return web.json_response({"error": "missing signature header"}, status=400)
        try:
            req = json.loads(body)
            metadata, pem, _ts = req["metadata"], req["public_key"], int(req["timestamp"])
            key = serialization.load_pem_public_key(pem.encode())
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(base64.b64decode(sig), body, padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, KeyError, TypeError, AssertionError, InvalidSignature):
            return web.json_response({"error": "signature verification failed"}, status=400)
        self.auth_requests.append(req)
        mac = metadata["rdfm.hardware.macaddr"]
        if self.devices.get(mac) != pem:
            self.registrations[(mac, pem)] = metadata
            return web.json_response({"error": "device unauthorized"}, status=401)
        claims = {"device_id": mac, "created_at": int(time.time()), "expires": self.token_expiry}
        token = self._jwt({**claims, "jti": uuid.uuid4().hex})
        self.issued.append(token)
        return web.json_response({"token": token, "expires": self.token_expiry})

    async def update_check(self, request: web.Request) -> web.Response:
        token = self._device_token(request)
        if token is None:
            self.checks.append((401, {}))
            return web.json_response({"error": "invalid token was provided"}, status=401)
        meta = await request.json()
        if not isinstance(meta, dict) or any(k not in meta for k in META):
            self.checks.append((400, meta))
            return web.json_response({"error": "schema validation failed"}, status=400)
        mac = meta["rdfm.hardware.macaddr"]
        if mac not in self.devices:
            return web.json_response({"error": "provided MAC address does not match any device"}, status=500)
        pkg = self.assigned.get(mac)
        if (
            pkg is None
            or pkg.devtype != meta["rdfm.hardware.devtype"]
            or pkg.version == meta["rdfm.software.version"]
        ):
            self.checks.append((204, meta))
            return web.Response(status=204)
        self.checks.append((200, meta))
        base = f"{request.scheme}://{request.host}"
        return web.json_response(
            {
                "id": pkg.id,
                "created": "Mon, 14 Aug 2023 13:03:27 GMT",
                "sha256": pkg.sha256,
                "uri": f"{base}/local_storage/{pkg.uuid}",
            }
        )

    async def logs_create(self, request: web.Request) -> web.Response:
        token = self._device_token(request)
        if token is None:
            return web.json_response({"error": "invalid token"}, status=401)
        batch = await request.json()
        outcome = any(_is_outcome(e) for e in batch["batch"])
        fault = self.outcome_faults.pop(0) if outcome and self.outcome_faults else None
        if isinstance(fault, int):
            return web.json_response({"error": "injected fault"}, status=fault)
        for entry in batch["batch"]:
            self.logs.append({"device_id": token["device_id"], **entry})
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
        return web.json_response({})

    def outcomes(self, device_id: str) -> list[dict[str, Any]]:
        """The final outcomes (LwM2M result set) the device's log holds, decoded."""
        return [json.loads(e["entry"]) for e in self.logs
                if e["device_id"] == device_id and _is_outcome(e)]


def _is_outcome(entry: dict[str, Any]) -> bool:
    if entry.get("name") != "smp-gateway.update":
        return False
    try:
        return bool(json.loads(entry["entry"]).get("result"))
    except (ValueError, KeyError, AttributeError):
        return False
