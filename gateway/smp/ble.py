"""SMP over Bluetooth LE: the MCUmgr GATT service, through BlueZ (bleak) or Google's Bumble.

Owns the BLE link to one device: find it (by address or advertised name, one scan at a time per
adapter), connect, find the SMP characteristic, learn the ATT MTU, subscribe to notifications,
then move whole SMP packets: a request is cut into ATT writes of at most MTU-3 bytes (write
without response), notifications are glued back into packets by the length in the SMP header.
A disconnection (the device resets: MCUboot swaps, the app restarts and advertises again)
fails the link with ``TransportError``; the update engine then closes and re-opens the
session, and ``open`` waits (``scan_timeout_s``) for the device to advertise again.

What Zephyr does on the other side (``subsys/mgmt/mcumgr/transport/src/smp_bt.c``): one
characteristic with WRITE_WITHOUT_RESP | NOTIFY (+ CCC); with
``CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY`` the writes of one request are collected until the
header's length is reached (more bytes than that drop the packet), without it every write is
one packet; responses are notified in pieces of ``bt_gatt_get_mtu() - 3``; requests of a
connection that went away are dropped and their answers never sent.

The Bluetooth stack sits behind :class:`GattClient` (scan/connect/discover/MTU/notify/write/
disconnect). Two implementations: :class:`BleakGattClient` (BlueZ over D-Bus, what a Linux
gateway normally uses) and :class:`BumbleGattClient` (Bumble on any HCI transport: a USB
dongle, an HCI socket, a UART, a TCP bridge, or an in-process virtual link for the tests).
Everything SMP-specific (fragmenting, reassembly, disconnect handling, reconnect) is in
:class:`BleLink` and shared by both. UUIDs and the MTU handling follow smpclient's
``transport/ble.py`` (bleak) and ``transport/bumble/`` (bumble).

Limits for the scheduler: a controller holds only a few connections at once (and scans and
connection setup on one adapter are best done one at a time); :func:`adapter_key` names the
adapter a device uses and :func:`adapter_limit` its cap (``ble_per_adapter`` /
``ble_adapters`` in the gateway config). Scans and connection set-up are serialised here with
one ``asyncio.Lock`` per adapter (:func:`scan_lock`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import weakref
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smpclient.transport import SMP_CHARACTERISTIC_UUID as _SMP_CHR_UUID
from smpclient.transport import SMP_SERVICE_UUID as _SMP_SVC_UUID

from gateway.smp.transport import Transport, TransportClosed, TransportError

if TYPE_CHECKING:
    from gateway.config import BleTransport, GatewayConfig

log = logging.getLogger(__name__)

SMP_SERVICE_UUID = str(_SMP_SVC_UUID).lower()  # 8d53dc1d-1db7-4cd3-868b-8a527460aa84
SMP_CHARACTERISTIC_UUID = str(_SMP_CHR_UUID).lower()  # da2e7828-fbce-4e01-ae9e-261174997c48
ATT_DEFAULT_MTU = 23
ATT_WRITE_OVERHEAD = 3  # opcode + handle, in front of every write and notification
L2CAP_HEADER = 4
SMP_HEADER = 8
SMP_MAX_PACKET = SMP_HEADER + 0xFFFF
DISCONNECT_TIMEOUT_S = 3.0

BLUEZ_ABSENT = "BLE needs BlueZ over D-Bus: {what} not available on this machine: {reason}"


class BleError(TransportError):
    """The BLE link could not be set up or failed."""


class BleUnavailable(BleError):
    """The Bluetooth stack itself is missing (no D-Bus, no bluetoothd, no adapter, no package)."""


# ---------------------------------------------------------------------------------------------
# per-adapter coordination (one event loop may run many links; tests run many loops)

_scan_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def scan_lock(adapter: str) -> asyncio.Lock:
    """The lock that serialises scanning and connection set-up on ``adapter`` (this loop)."""
    locks = _scan_locks.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(adapter, asyncio.Lock())


def adapter_key(t: BleTransport) -> str:
    """The adapter a BLE device is reached through: the key of the per-adapter connection cap.

    bleak: the BlueZ adapter (``adapter``, hci0 by default). bumble: the HCI transport spec
    (``hci``: ``usb:0``, ``tcp-client:...``) unless ``adapter`` is set explicitly as a label -
    "hci0" would name a BlueZ adapter the bumble backend never touches (gateway config (c))."""
    if t.backend == "bumble" and "adapter" not in t.model_fields_set and t.hci:
        return t.hci
    return t.adapter


def adapter_limit(cfg: GatewayConfig, adapter: str) -> int:
    """Simultaneous sessions allowed on ``adapter`` (``ble_adapters`` overrides ``ble_per_adapter``)."""
    return int(cfg.ble_adapters.get(adapter, cfg.ble_per_adapter))


# ---------------------------------------------------------------------------------------------
# the GATT client interface: what differs between Bluetooth stacks


@dataclass
class Advert:
    """A device seen advertising: its address, name and the stack's own handle for it."""

    address: str
    name: str | None
    handle: Any = None


def _matches(cfg: BleTransport, address: str, name: str | None) -> bool:
    if cfg.address and address.upper() != cfg.address.upper():
        return False
    return not (cfg.name and name != cfg.name)


class GattClient(abc.ABC):
    """One GATT connection to one SMP server, through some Bluetooth stack."""

    def __init__(self, cfg: BleTransport, on_disconnect: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.on_disconnect = on_disconnect

    @abc.abstractmethod
    async def find(self, timeout_s: float) -> Advert | None:
        """Scan until the configured device (address and/or name) advertises; None on timeout."""

    @abc.abstractmethod
    async def connect(self, advert: Advert, timeout_s: float) -> None:
        """Open the LE connection to a device just seen advertising."""

    @abc.abstractmethod
    async def discover(self) -> None:
        """Find the SMP service and characteristic; BleError if the device has none."""

    @abc.abstractmethod
    async def negotiate_mtu(self, preferred: int) -> int:
        """The ATT MTU in force on the connection (exchanged up to ``preferred`` if the stack lets us)."""

    @abc.abstractmethod
    async def start_notify(self, callback: Callable[[bytes], None]) -> None:
        """Subscribe to the SMP characteristic's notifications."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """One ATT Write Command (write without response) of at most MTU-3 bytes."""

    @abc.abstractmethod
    async def disconnect(self) -> None:
        """Drop the connection and release the stack's resources; never raises."""


# ---------------------------------------------------------------------------------------------
# bleak (BlueZ over D-Bus)


def _bluez_unavailable(exc: BaseException, adapter: str) -> BleUnavailable | None:
    """Map bleak/dbus-fast errors that mean "no BlueZ here" to one clear message."""
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, OSError) or "system_bus_socket" in text or name == "AuthError":
        bus = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")
        what = f"the D-Bus system bus ({bus}) is"
    elif "ServiceUnknown" in text or ("org.bluez" in text and "not provided" in text):
        what = "the BlueZ daemon (bluetoothd, D-Bus name org.bluez) is"
    elif "adapter" in text.lower() and ("not found" in text.lower() or "no bluetooth" in text.lower()):
        what = f"the Bluetooth adapter {adapter} is"
    elif "UnknownObject" in text or "NotReady" in text or "powered" in text.lower():
        what = f"the Bluetooth adapter {adapter} (powered on) is"
    else:
        return None
    err = BleUnavailable(BLUEZ_ABSENT.format(what=what, reason=f"{name}: {text}"))
    err.__cause__ = exc
    return err


class BleakGattClient(GattClient):
    """BlueZ through bleak: the ordinary way on a Linux gateway (bluetoothd owns the adapter)."""

    def __init__(self, cfg: BleTransport, on_disconnect: Callable[[str], None]) -> None:
        super().__init__(cfg, on_disconnect)
        try:
            import bleak
        except ImportError as exc:  # pragma: no cover - bleak is a dependency
            raise BleUnavailable("BLE (backend bleak) needs the 'bleak' package: pip install bleak") from exc
        self._bleak = bleak
        self._client: Any = None
        self._char: Any = None

    def _wrap(self, exc: BaseException, doing: str) -> BleError:
        unavailable = _bluez_unavailable(exc, self.cfg.adapter)
        if unavailable is not None:
            return unavailable
        return BleError(f"{doing}: {type(exc).__name__}: {exc}")

    async def find(self, timeout_s: float) -> Advert | None:
        def match(dev: Any, adv: Any) -> bool:
            return _matches(self.cfg, str(dev.address), adv.local_name or dev.name)

        try:
            dev = await self._bleak.BleakScanner.find_device_by_filter(
                match, timeout=timeout_s, bluez={"adapter": self.cfg.adapter}
            )
        except Exception as exc:
            raise self._wrap(exc, f"scan on {self.cfg.adapter}") from exc
        if dev is None:
            return None
        return Advert(str(dev.address), dev.name, dev)

    async def connect(self, advert: Advert, timeout_s: float) -> None:
        def lost(_client: Any) -> None:
            self.on_disconnect("BlueZ reported the disconnection")

        self._client = self._bleak.BleakClient(
            advert.handle, disconnected_callback=lost, services=[SMP_SERVICE_UUID],
            timeout=timeout_s, bluez={"adapter": self.cfg.adapter},
        )
        try:
            await self._client.connect()
        except Exception as exc:
            raise self._wrap(exc, f"connect to {advert.address}") from exc

    async def discover(self) -> None:
        # BleakClient.connect already resolved the services (limited to the SMP service)
        char = self._client.services.get_characteristic(SMP_CHARACTERISTIC_UUID)
        if char is None:
            raise BleError(f"{self._client.address} has no SMP characteristic {SMP_CHARACTERISTIC_UUID}")
        self._char = char

    async def negotiate_mtu(self, preferred: int) -> int:
        # BlueZ exchanges the MTU by itself when it connects (up to 517); bleak only has to read
        # it, which on BlueZ takes an AcquireWrite/AcquireNotify round trip (smpclient does the same).
        backend = self._client._backend
        if type(backend).__name__ == "BleakClientBlueZDBus":
            with contextlib.suppress(Exception):
                await backend._acquire_mtu()
            with contextlib.suppress(Exception):
                return int(self._client.mtu_size)
        return int(self._char.max_write_without_response_size) + ATT_WRITE_OVERHEAD

    async def start_notify(self, callback: Callable[[bytes], None]) -> None:
        try:
            await self._client.start_notify(self._char, lambda _c, data: callback(bytes(data)))
        except Exception as exc:
            raise self._wrap(exc, "subscribe to SMP notifications") from exc

    async def write(self, data: bytes) -> None:
        try:
            await self._client.write_gatt_char(self._char, data, response=False)
        except Exception as exc:
            raise self._wrap(exc, "write") from exc

    async def disconnect(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), DISCONNECT_TIMEOUT_S)
            self._client = None


# ---------------------------------------------------------------------------------------------
# bumble: a host stack in this process, on any HCI transport

_local_links: dict[str, Any] = {}


def local_link(name: str) -> Any:
    """The in-process virtual radio ``link:NAME`` (a ``bumble.link.LocalLink``)."""
    from bumble.link import LocalLink

    if name not in _local_links:
        _local_links[name] = LocalLink()
    return _local_links[name]


@dataclass
class BumbleHci:
    """An opened HCI transport: packets from the controller (source) and to it (sink)."""

    source: Any
    sink: Any
    close: Callable[[], Any]


async def open_bumble_hci(spec: str, label: str = "hci") -> BumbleHci:
    """Open ``spec``: any bumble transport name, or ``link:NAME`` for a virtual controller on the
    in-process link NAME (a new ``bumble.controller.Controller`` per call)."""
    if spec.startswith("link:"):
        from bumble.controller import Controller
        from bumble.transport.common import AsyncPipeSink

        link = local_link(spec[5:])
        controller = Controller(label, link=link)

        def close() -> None:
            with contextlib.suppress(KeyError, ValueError):
                link.remove_controller(controller)

        return BumbleHci(controller, AsyncPipeSink(controller), close)
    from bumble.transport import open_transport

    try:
        transport = await open_transport(spec)
    except Exception as exc:
        raise BleUnavailable(
            f"cannot open the bumble HCI transport {spec!r}: {type(exc).__name__}: {exc}") from exc
    return BumbleHci(transport.source, transport.sink, transport.close)


def random_static_address(seed: str) -> str:
    """A stable random static BD_ADDR (two top bits set) derived from ``seed``."""
    h = zlib.crc32(seed.encode()).to_bytes(4, "big") + zlib.crc32(seed[::-1].encode()).to_bytes(4, "big")
    b = bytearray(h[:6])
    b[0] |= 0xC0
    return ":".join(f"{x:02X}" for x in b)


class _BumbleHost:
    """One bumble host (``Device``) per HCI transport, shared by every link on that controller."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.users = 0
        self.device: Any = None
        self.hci: BumbleHci | None = None
        self.lock = asyncio.Lock()  # one scan / pending connection at a time on a controller

    async def start(self) -> None:
        from bumble.device import Device
        from bumble.hci import Address

        self.hci = await open_bumble_hci(self.spec, label=f"gateway@{self.spec}")
        addr = Address(random_static_address(f"smp-gateway/{self.spec}"), Address.RANDOM_DEVICE_ADDRESS)
        self.device = Device.with_hci("smp-gateway", addr, self.hci.source, self.hci.sink)
        try:
            await self.device.power_on()
        except Exception as exc:
            await self.stop()
            raise BleUnavailable(f"bumble controller on {self.spec!r} did not start: {exc}") from exc

    async def stop(self) -> None:
        if self.device is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.device.power_off(), DISCONNECT_TIMEOUT_S)
            self.device = None
        if self.hci is not None:
            with contextlib.suppress(Exception):
                res = self.hci.close()
                if asyncio.iscoroutine(res):
                    await res
            self.hci = None


_bumble_hosts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _BumbleHost]] = (
    weakref.WeakKeyDictionary()
)
_bumble_hosts_lock: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


@contextlib.asynccontextmanager
async def _host_registry() -> AsyncIterator[dict[str, _BumbleHost]]:
    loop = asyncio.get_running_loop()
    lock = _bumble_hosts_lock.setdefault(loop, asyncio.Lock())
    async with lock:
        yield _bumble_hosts.setdefault(loop, {})


async def _acquire_host(spec: str) -> _BumbleHost:
    async with _host_registry() as hosts:
        host = hosts.get(spec)
        if host is None:
            host = _BumbleHost(spec)
            await host.start()
            hosts[spec] = host
        host.users += 1
        return host


async def _release_host(host: _BumbleHost) -> None:
    async with _host_registry() as hosts:
        host.users -= 1
        if host.users <= 0:
            hosts.pop(host.spec, None)
            await host.stop()


def _advert_name(adv: Any) -> str | None:
    from bumble.core import AdvertisingData

    for t in (AdvertisingData.COMPLETE_LOCAL_NAME, AdvertisingData.SHORTENED_LOCAL_NAME):
        v = adv.data.get(t)
        if isinstance(v, str):
            return v
        if isinstance(v, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                return v.decode()
    return None


class BumbleGattClient(GattClient):
    """Google's Bumble host stack on an HCI transport (``BleTransport.hci``)."""

    def __init__(self, cfg: BleTransport, on_disconnect: Callable[[str], None]) -> None:
        super().__init__(cfg, on_disconnect)
        assert cfg.hci is not None
        self.spec = cfg.hci
        self._host: _BumbleHost | None = None
        self._conn: Any = None
        self._peer: Any = None
        self._char: Any = None

    async def _ensure_host(self) -> _BumbleHost:
        if self._host is None:
            self._host = await _acquire_host(self.spec)
        return self._host

    async def find(self, timeout_s: float) -> Advert | None:
        host = await self._ensure_host()
        device = host.device
        found: asyncio.Future[Advert] = asyncio.get_running_loop().create_future()

        def on_adv(adv: Any) -> None:
            address = adv.address.to_string(False)
            name = _advert_name(adv)
            if not found.done() and _matches(self.cfg, address, name):
                found.set_result(Advert(address, name, adv.address))

        async with host.lock:
            device.on("advertisement", on_adv)
            try:
                await device.start_scanning(filter_duplicates=False)
                try:
                    return await asyncio.wait_for(found, timeout_s)
                except TimeoutError:
                    return None
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(device.stop_scanning(), 2.0)
            finally:
                device.remove_listener("advertisement", on_adv)

    async def connect(self, advert: Advert, timeout_s: float) -> None:
        host = await self._ensure_host()
        async with host.lock:
            try:
                self._conn = await host.device.connect(advert.handle, timeout=timeout_s)
            except Exception as exc:
                raise BleError(f"connect to {advert.address}: {type(exc).__name__}: {exc}") from exc

        def lost(reason: int) -> None:
            self.on_disconnect(f"disconnected, HCI reason 0x{reason:02X} ({_hci_reason(reason)})")

        self._conn.on("disconnection", lost)

    async def discover(self) -> None:
        from bumble.core import UUID
        from bumble.device import Peer

        self._peer = Peer(self._conn)
        await self._peer.discover_services([UUID(SMP_SERVICE_UUID)])
        services = self._peer.get_services_by_uuid(UUID(SMP_SERVICE_UUID))
        if not services:
            raise BleError(f"{self._conn.peer_address} has no SMP service {SMP_SERVICE_UUID}")
        await services[0].discover_characteristics()
        chars = services[0].get_characteristics_by_uuid(UUID(SMP_CHARACTERISTIC_UUID))
        if not chars:
            raise BleError(f"{self._conn.peer_address} has no SMP characteristic {SMP_CHARACTERISTIC_UUID}")
        self._char = chars[0]

    async def negotiate_mtu(self, preferred: int) -> int:
        if self._conn.att_mtu >= preferred:
            return int(self._conn.att_mtu)
        try:
            return int(await self._peer.request_mtu(preferred))
        except Exception as exc:  # the peer may refuse: keep what the link has
            log.info("ATT MTU exchange failed (%s): staying at %d", exc, self._conn.att_mtu)
            return int(self._conn.att_mtu)

    async def start_notify(self, callback: Callable[[bytes], None]) -> None:
        await self._char.subscribe(lambda value: callback(bytes(value)), prefer_notify=True)

    async def write(self, data: bytes) -> None:
        try:
            await self._char.write_value(data, with_response=False)
        except Exception as exc:
            raise BleError(f"write: {type(exc).__name__}: {exc}") from exc

    async def disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.remove_all_listeners("disconnection")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.disconnect(), DISCONNECT_TIMEOUT_S)
        host, self._host = self._host, None
        if host is not None:
            await _release_host(host)


def _hci_reason(reason: int) -> str:
    try:
        from bumble.hci import HCI_ErrorCode

        return HCI_ErrorCode(reason).name
    except Exception:
        return "unknown"


def make_gatt_client(cfg: BleTransport, on_disconnect: Callable[[str], None]) -> GattClient:
    if cfg.backend == "bumble":
        return BumbleGattClient(cfg, on_disconnect)
    return BleakGattClient(cfg, on_disconnect)


# ---------------------------------------------------------------------------------------------
# the transport


class SmpReassembler:
    """Whole SMP packets out of a stream of notification payloads (length from the header)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.errors = 0

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= SMP_HEADER:
            op = self._buf[0] & 0x07
            if op not in (1, 3):  # a response starts every packet the device notifies
                self.errors += 1
                self._buf.clear()
                break
            total = SMP_HEADER + int.from_bytes(self._buf[2:4], "big")
            if len(self._buf) < total:
                break
            out.append(bytes(self._buf[:total]))
            del self._buf[:total]
        return out


class BleLink(Transport):
    """SMP over the MCUmgr GATT service of one device (``BleTransport`` config)."""

    name = "ble"

    def __init__(self, cfg: BleTransport,
                 client_factory: Callable[[BleTransport, Callable[[str], None]], GattClient] | None = None
                 ) -> None:
        super().__init__()
        self.cfg = cfg
        self._factory = client_factory or make_gatt_client
        self._client: GattClient | None = None
        self._connected = False
        self._att_mtu = ATT_DEFAULT_MTU
        self._reasm = SmpReassembler()
        self._wlock = asyncio.Lock()
        self._token = object()
        self.connects = 0  # successful opens (1 + reconnections)
        self.disconnects: list[str] = []  # reasons of link losses seen

    @property
    def address(self) -> str:
        return self.cfg.address or f"name={self.cfg.name}"

    @property
    def adapter(self) -> str:
        return adapter_key(self.cfg)

    @property
    def att_mtu(self) -> int:
        return self._att_mtu

    @property
    def max_write(self) -> int:
        return self._att_mtu - ATT_WRITE_OVERHEAD

    @property
    def max_packet(self) -> int:
        # with reassembly on the device, the device's buf_size (applied by the session) is the limit
        return SMP_MAX_PACKET if self.cfg.reassembly else self.max_write

    def link_overhead(self, packet_len: int) -> int:
        frags = max(1, -(-packet_len // self.max_write))
        return frags * (ATT_WRITE_OVERHEAD + L2CAP_HEADER)

    @property
    def open_deadline_s(self) -> float:
        """The longest :meth:`open` takes: the scan, the connection (+1 s) and the GATT set-up,
        each bounded by its own timeout, which says what failed. A caller's deadline must not
        expire first, or the reason is lost (an empty ``TimeoutError``)."""
        return self.cfg.scan_timeout_s + 2 * self.cfg.connect_timeout_s + 2.0

    async def open(self) -> None:
        if self._client is not None:
            await self._drop_client()
        self._fresh_rx()  # forget the failure/close markers of the previous connection
        self._reasm.reset()
        client = self._factory(self.cfg, self._lost_cb())
        self._client = client
        target = f"{self.address} on {self.adapter}"
        try:
            async with scan_lock(self.adapter):
                advert = await client.find(self.cfg.scan_timeout_s)
                if advert is None:
                    raise BleError(f"no advertisement from {self.address} within "
                                   f"{self.cfg.scan_timeout_s:g}s on {self.adapter}")
                try:
                    await asyncio.wait_for(client.connect(advert, self.cfg.connect_timeout_s),
                                           self.cfg.connect_timeout_s + 1.0)
                except TimeoutError as exc:
                    raise BleError(f"{target}: connection timed out") from exc
            async with asyncio.timeout(self.cfg.connect_timeout_s):
                await client.discover()
                self._att_mtu = max(ATT_DEFAULT_MTU, await client.negotiate_mtu(self.cfg.mtu))
                await client.start_notify(self._on_notify)
        except BaseException as exc:
            await self._drop_client()
            if isinstance(exc, TransportError | asyncio.CancelledError):
                raise
            if isinstance(exc, TimeoutError):
                raise BleError(f"{target}: GATT discovery timed out") from exc
            raise BleError(f"{target}: {type(exc).__name__}: {exc}") from exc
        self._connected = True
        self.connects += 1
        log.info("ble %s connected (adapter %s, ATT MTU %d, %s)", advert.address, self.adapter,
                 self._att_mtu, "device reassembles" if self.cfg.reassembly else "one packet per write")

    def _lost_cb(self) -> Callable[[str], None]:
        # bound to one connection attempt: a late callback of an old client fails nothing
        token = object()
        self._token = token

        def lost(reason: str) -> None:
            if self._token is not token or not self._connected:
                return
            self._connected = False
            self.disconnects.append(reason)
            log.info("ble %s link lost: %s", self.address, reason)
            self._fail(BleError(f"BLE link to {self.address} lost: {reason}"))

        return lost

    def _on_notify(self, data: bytes) -> None:
        self.bytes_received += len(data) + ATT_WRITE_OVERHEAD + L2CAP_HEADER
        for pkt in self._reasm.feed(data):
            self._rx.put_nowait(pkt)

    async def send(self, packet: bytes) -> None:
        client = self._client
        if client is None or not self._connected:
            raise TransportClosed(f"BLE link to {self.address} is not connected")
        if len(packet) > self.max_packet:
            raise BleError(f"SMP packet of {len(packet)} bytes exceeds the link's {self.max_packet}")
        step = self.max_write
        async with self._wlock:  # the fragments of one packet must not interleave with another's
            for off in range(0, len(packet), step):
                if not self._connected:
                    raise BleError(f"BLE link to {self.address} lost while writing")
                await client.write(packet[off : off + step])
        self.bytes_sent += len(packet) + self.link_overhead(len(packet))

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._connected = False
        self._token = object()
        if client is not None:
            await client.disconnect()

    async def close(self) -> None:
        await self._drop_client()
        self._fail(TransportClosed("closed"))
