"""Azure IoT Hub's device-side MQTT API, as Microsoft documents it, on a real mosquitto with TLS.

Plays the hub for the tests as an MQTT client of the broker (the devices - here Microsoft's own
``azure-iot-device`` SDK inside the gateway - connect to the broker's TLS listener). Written
from Microsoft's documentation, NOT from the gateway's code, so a test against it checks the
gateway (and the SDK under it) against what the hub is documented to do:

* Communicate with an IoT hub using MQTT - device twins (``$iothub/twin/res/#``; GET on
  ``$iothub/twin/GET/?$rid={request id}`` answered on ``$iothub/twin/res/200/?$rid=...`` with
  the twin's ``desired`` and ``reported`` objects; a reported-properties patch on
  ``$iothub/twin/PATCH/properties/reported/?$rid=...`` answered ``204`` with the new reported
  ``$version`` (``$iothub/twin/res/204/?$rid=...&$version=...``), ``400`` for a bad body,
  ``429`` when throttled, ``5xx`` for server errors; desired-property patches published on
  ``$iothub/twin/PATCH/properties/desired/?$version={new version}``):
  https://learn.microsoft.com/en-us/azure/iot-hub/iot-hub-mqtt-support (now
  https://learn.microsoft.com/en-us/azure/iot/iot-mqtt-connect-to-iot-hub)
* Direct methods (the device subscribes ``$iothub/methods/POST/#``; a call arrives on
  ``$iothub/methods/POST/{method name}/?$rid={request id}`` and the device answers on
  ``$iothub/methods/res/{status}/?$rid={request id}``; the caller gets the status and payload,
  or a timeout): https://docs.microsoft.com/en-us/azure/iot-hub/iot-hub-devguide-direct-methods
* Device twins (desired/reported sections, ``$version`` incremented on every change, JSON merge
  semantics with ``null`` deleting a property, size limits):
  https://learn.microsoft.com/en-us/azure/iot-hub/iot-hub-devguide-device-twins
* Device Provisioning Service over MQTT (``AzureDps``; the device subscribes
  ``$dps/registrations/res/#``, registers on ``$dps/registrations/PUT/iotdps-register/?$rid=...``
  with ``{"registrationId": ...}``, gets ``202`` + ``retry-after`` with an ``operationId`` and
  ``"status": "assigning"``, polls ``$dps/registrations/GET/iotdps-get-operationstatus/?$rid=
  ...&operationId=...`` until ``200`` with ``"status": "assigned"`` and the
  ``registrationState`` - ``assignedHub``, ``deviceId``; errors are the status in the response
  topic with ``{errorCode, trackingId, message}``):
  https://learn.microsoft.com/en-us/azure/iot-dps/iot-dps-mqtt-support and the runtime
  registration REST reference (RegistrationOperationStatus, DeviceRegistrationResult)

Not played: SAS-token checks (mosquitto does not pass the password on; ``allow_anonymous``),
per-connection topic scoping (one device identity per broker here), telemetry and C2D.

The SDK connects to port 8883 only (``MQTTTransport.connect`` fixes it), so each broker gets
its own loopback address 127.a.b.c (the whole of 127/8 is on ``lo``), chosen at random and
probed, with a server certificate for that IP from a test CA made here: parallel runs and
tests never share a listener.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import ipaddress
import json
import random
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet_servers.mosquitto import Mosquitto, free_port


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, ca: bool, ip: str | None = None,
          more_ips: tuple[str, ...] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip is not None:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(a)) for a in (ip, *more_ips)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls(tmp: Path, ip: str, *more_ips: str) -> TlsFiles:
    """A test CA and a server certificate for ``ip`` (and ``more_ips``), PEM files in ``tmp``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test hub CA")])
    ca = _cert("test hub CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(ip, key, ca_name, ca_key, ca=False, ip=ip, more_ips=more_ips)
    out = TlsFiles(tmp / "hub-ca.pem", tmp / "hub-cert.pem", tmp / "hub-key.pem")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return out


def _free_loopback(but: str = "") -> str:
    """A 127.a.b.c whose port 8883 nobody listens on (probed by binding it)."""
    rng = random.Random()
    for _ in range(50):
        ip = f"127.{rng.randint(2, 254)}.{rng.randint(0, 254)}.{rng.randint(2, 254)}"
        if ip == but:
            continue
        with socket.socket() as s:
            try:
                s.bind((ip, 8883))
            except OSError:
                continue
        return ip
    raise RuntimeError("no free loopback address for port 8883")


class Broker(Mosquitto):
    """A mosquitto with a TLS listener on ``ip``:8883 (for the SDK) and a plain one on
    127.0.0.1:``port`` (for the hub's side); ``restart()`` stops and starts it on both."""

    def __init__(self, tmp: Path, ip: str, tls: TlsFiles, dps_ip: str = "") -> None:
        self.ip, self.tls = ip, tls
        self.dps_ip = dps_ip  # a second TLS listener on another address: the DPS endpoint
        port = free_port()
        listeners = "".join(f"listener 8883 {a}\ncafile {tls.ca}\ncertfile {tls.cert}\n"
                            f"keyfile {tls.key}\n" for a in (ip, dps_ip) if a)
        super().__init__(tmp, port, conf_name="mosquitto-hub.conf", config=(
            f"{listeners}listener {port} 127.0.0.1\nallow_anonymous true\n"
            # sessions survive a restart as IoT Hub's do: the SDK connects with
            # clean_session=False and does not subscribe again when it reconnects
            f"persistence true\npersistence_location {tmp}/\nlog_dest stderr\nlog_type error\n"
            f"user {getpass.getuser()}\n"))  # as root, mosquitto would drop to a user who cannot read tmp


@asynccontextmanager
async def hub_broker(tmp: Path, dps: bool = False) -> AsyncIterator[Broker]:
    """``dps``: a second TLS listener (``broker.dps_ip``) for ``AzureDps``."""
    ip = _free_loopback()
    dps_ip = _free_loopback(but=ip) if dps else ""
    b = Broker(tmp, ip, make_tls(tmp, ip, *([dps_ip] if dps_ip else [])), dps_ip=dps_ip)
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Twin merge: a ``null`` deletes the property, objects merge, anything else replaces."""
    # from Microsoft's device-twins doc, deliberately not shared with gateway/sources/azure/twin.py
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


class _Served:
    """``async with``: runs ``_serve`` (an MQTT client of the broker) as a task until it sets
    ``_ready``; cancels it on exit."""

    _task: asyncio.Task[None] | None
    _ready: asyncio.Event

    async def _serve(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._serve())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class AzureHub(_Served):
    """The hub's side of one device identity. ``desired``/``reported`` hold the twin's
    properties, ``*_version`` their ``$version``. ``set_desired`` changes the twin as a
    service-side update (an automatic device configuration) does and, unless ``deliver`` is
    False (a patch the device missed), publishes the desired patch. ``reported_answer``: the
    status the next reported patches get (``None``: no answer at all); ``invoke`` calls a
    direct method and returns (status, payload) or raises TimeoutError."""

    broker: Broker
    desired: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 1
    reported: dict[str, Any] = field(default_factory=dict)
    reported_version: int = 1
    reported_patches: list[dict[str, Any]] = field(default_factory=list)
    refused_patches: list[dict[str, Any]] = field(default_factory=list)
    gets: int = 0
    reported_answer: Callable[[dict[str, Any]], int | None] = lambda _p: 204
    _client: aiomqtt.Client | None = None
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _methods: dict[str, asyncio.Future[tuple[int, Any]]] = field(default_factory=dict)

    async def _serve(self) -> None:
        while True:  # the broker may be restarted by a test: connect again
            try:
                async with aiomqtt.Client("127.0.0.1", self.broker.port,
                                          identifier=f"hub-{uuid.uuid4().hex[:8]}") as client:
                    self._client = client
                    await client.subscribe([("$iothub/twin/GET/#", 0),
                                            ("$iothub/twin/PATCH/properties/reported/#", 0),
                                            ("$iothub/methods/res/#", 0)])
                    self._ready.set()
                    async for msg in client.messages:
                        await self._handle(msg.topic.value, bytes(msg.payload or b""))
            except aiomqtt.MqttError:
                self._ready.clear()
                self._client = None
                await asyncio.sleep(0.05)

    @staticmethod
    def _split(topic: str) -> tuple[list[str], dict[str, str]]:
        path, _, query = topic.partition("?")
        return [p for p in path.split("/") if p], {k: v[0] for k, v in parse_qs(query).items()}

    async def _publish(self, topic: str, body: Any) -> None:
        await asyncio.wait_for(self._ready.wait(), 20)
        assert self._client is not None
        await self._client.publish(topic, b"" if body is None else json.dumps(body).encode(), qos=0)

    async def _handle(self, topic: str, payload: bytes) -> None:
        parts, q = self._split(topic)
        rid = q.get("$rid", "")
        if parts[:3] == ["$iothub", "twin", "GET"]:
            self.gets += 1
            twin = {"desired": {**self.desired, "$version": self.desired_version},
                    "reported": {**self.reported, "$version": self.reported_version}}
            await self._publish(f"$iothub/twin/res/200/?$rid={rid}", twin)
        elif parts[:5] == ["$iothub", "twin", "PATCH", "properties", "reported"]:
            try:
                patch = json.loads(payload)
                if not isinstance(patch, dict):
                    raise ValueError("not an object")
            except ValueError:
                await self._publish(f"$iothub/twin/res/400/?$rid={rid}", None)
                return
            status = self.reported_answer(patch)
            if status is None:  # no answer at all (the SDK's request stays open)
                self.refused_patches.append(patch)
                return
            if status != 204:
                self.refused_patches.append(patch)
                await self._publish(f"$iothub/twin/res/{status}/?$rid={rid}", None)
                return
            async with self._changed:
                self.reported = merge(self.reported, patch)
                self.reported_version += 1
                self.reported_patches.append(patch)
                self._changed.notify_all()
            await self._publish(f"$iothub/twin/res/204/?$rid={rid}&$version="
                                f"{self.reported_version}", None)
        elif parts[:3] == ["$iothub", "methods", "res"] and len(parts) >= 4:
            fut = self._methods.pop(rid, None)
            if fut is not None and not fut.done():
                body = json.loads(payload) if payload else None
                fut.set_result((int(parts[3]), body))

    async def set_desired(self, patch: dict[str, Any], deliver: bool = True) -> None:
        self.desired = merge(self.desired, patch)
        self.desired_version += 1
        if deliver:
            await self._publish(f"$iothub/twin/PATCH/properties/desired/?$version="
                                f"{self.desired_version}", {**patch, "$version": self.desired_version})

    async def invoke(self, method: str, payload: Any, timeout_s: float = 10) -> tuple[int, Any]:
        rid = uuid.uuid4().hex[:12]
        fut: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._methods[rid] = fut
        await self._publish(f"$iothub/methods/POST/{method}/?$rid={rid}", payload)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._methods.pop(rid, None)

    async def wait_reported(self, pred: Callable[[dict[str, Any]], bool],
                            timeout_s: float = 30) -> dict[str, Any]:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: pred(self.reported)), timeout_s)
        return self.reported

    def connection_string(self, device_id: str = "gw-1") -> str:
        return (f"HostName={self.broker.ip};DeviceId={device_id};"
                "SharedAccessKey=dGVzdC1rZXktbm90LWNoZWNrZWQtYnktbW9zcXVpdHRv")


@dataclass
class AzureDps(_Served):
    """The Device Provisioning Service's device endpoint for one enrollment, on the broker's
    ``dps_ip`` listener. ``answer`` decides what a registration gets: ``"assign"`` (202, then
    200 assigned on the first status poll), ``"slow"`` (202 "assigning" on every poll, with
    ``retry_after``), or an error status (401, 404...) for the register request. ``hub``
    and ``device_id`` are the assignment; ``registrations`` the register bodies received."""

    broker: Broker
    hub: str = ""
    device_id: str = "gw-dps-1"
    answer: str | int = "assign"
    retry_after: int = 1
    registration_state: dict[str, Any] | None = None  # over the documented one (hostile)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    polls: int = 0
    _client: aiomqtt.Client | None = None
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def _serve(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.broker.port,
                                  identifier=f"dps-{uuid.uuid4().hex[:8]}") as client:
            self._client = client
            await client.subscribe([("$dps/registrations/PUT/#", 0),
                                    ("$dps/registrations/GET/#", 0)])
            self._ready.set()
            async for msg in client.messages:
                await self._handle(msg.topic.value, bytes(msg.payload or b""))

    async def _respond(self, status: int, rid: str, body: Any, retry_after: bool = False) -> None:
        assert self._client is not None
        extra = f"&retry-after={self.retry_after}" if retry_after else ""
        await self._client.publish(f"$dps/registrations/res/{status}/?$rid={rid}{extra}",
                                   json.dumps(body).encode(), qos=0)

    async def _handle(self, topic: str, payload: bytes) -> None:
        parts, q = AzureHub._split(topic)
        rid, op = q.get("$rid", ""), q.get("operationId", "")
        if parts[:4] == ["$dps", "registrations", "PUT", "iotdps-register"]:
            body = json.loads(payload) if payload else {}
            self.registrations.append(body)
            if isinstance(self.answer, int):
                await self._respond(self.answer, rid, {
                    "errorCode": self.answer * 1000 + 2, "trackingId": uuid.uuid4().hex,
                    "message": "refused by the test DPS"})
                return
            await self._respond(202, rid, {"operationId": f"4.{uuid.uuid4().hex}",
                                           "status": "assigning"}, retry_after=True)
        elif parts[:4] == ["$dps", "registrations", "GET", "iotdps-get-operationstatus"]:
            self.polls += 1
            if self.answer == "slow":
                await self._respond(202, rid, {"operationId": op, "status": "assigning"},
                                    retry_after=True)
                return
            reg = self.registrations[-1].get("registrationId", "") if self.registrations else ""
            state = {"registrationId": reg, "assignedHub": self.hub, "deviceId": self.device_id,
                     "status": "assigned", "substatus": "initialAssignment", "etag": "IjAi",
                     "createdDateTimeUtc": "2024-01-01T00:00:00Z",
                     "lastUpdatedDateTimeUtc": "2024-01-01T00:00:00Z",
                     **(self.registration_state or {})}
            await self._respond(200, rid, {"operationId": op, "status": state.get("status"),
                                           "registrationState": state})
