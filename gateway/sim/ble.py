"""The simulated device's Bluetooth LE SMP transport: a Bumble peripheral with the MCUmgr service.

Behaviour copied from Zephyr (``subsys/mgmt/mcumgr/transport/src/smp_bt.c`` and the smp_svr
sample's ``src/bluetooth.c``):

* GATT: primary service 8D53DC1D-1DB7-4CD3-868B-8A527460AA84 with one characteristic
  DA2E7828-FBCE-4E01-AE9E-261174997C48, properties WRITE_WITHOUT_RESPONSE | NOTIFY, write
  permission only, plus its CCC descriptor.
* Requests: with reassembly (``CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY``, default here) the
  writes of one connection are collected until the SMP header's length is reached; more bytes
  than the header announces drop the packet. Without it every write is one packet. A packet
  that finds no free netbuf (``buf_count``) is dropped like ``smp_packet_alloc`` failing.
* Responses: notified in pieces of ATT MTU - 3, one after the other, to the connection the
  request came on; if that connection is gone, the response is dropped.
* Advertising: connectable, the SMP service UUID and the device name
  (``CONFIG_BT_DEVICE_NAME``); it stops while a central is connected (one connection,
  ``CONFIG_BT_MAX_CONN=1``) and restarts when it leaves.
* Reset: the link goes down with the device (the central sees the connection drop); after
  the boot the device advertises again.

Differences: Zephyr puts the name in the scan response; Bumble's virtual controller sends no
scan responses, so the name goes into the advertising data and the service UUID there too when
both fit in 31 bytes (else into the scan response). A real reset is seen by the central only
at the supervision timeout; here the disconnection is immediate (reason 0x08, connection
timeout). No pairing/encryption (``CONFIG_MCUMGR_TRANSPORT_BT_PERM_RW``).

The controller is any Bumble HCI transport (``hci``); ``link:NAME`` puts a virtual controller
on the in-process link NAME, where a gateway using ``backend: bumble`` with the same
``hci: link:NAME`` finds it (see docs/ble.md for a real BlueZ central through a VHCI bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.smp.ble import (
    ATT_WRITE_OVERHEAD,
    SMP_CHARACTERISTIC_UUID,
    SMP_HEADER,
    SMP_SERVICE_UUID,
    BumbleHci,
    open_bumble_hci,
    random_static_address,
)

if TYPE_CHECKING:
    from gateway.sim.config import BleTransportConfig
    from gateway.sim.endpoint import DeviceSide

logger = logging.getLogger("gateway.sim.ble")

HCI_CONNECTION_TIMEOUT = 0x08  # what a central reports when the peripheral vanished
NOTIFY_DRAIN_S = 2.0


@dataclass
class _Conn:
    connection: Any
    buf: bytearray = field(default_factory=bytearray)
    queue: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    sender: asyncio.Task[None] | None = None
    alive: bool = True


class BleEndpoint:
    """SMP over BLE: a Bumble ``Device`` as a GATT peripheral on its own controller."""

    kind = "ble"

    def __init__(self, dev: DeviceSide, cfg: BleTransportConfig) -> None:
        self.dev = dev
        self.cfg = cfg
        self.name = cfg.name or dev.id
        self.bd_addr = (cfg.address or random_static_address(f"smp-sim/{dev.id}")).upper()
        self.device: Any = None
        self._hci: BumbleHci | None = None
        self._char: Any = None
        self._conns: dict[int, _Conn] = {}
        self._up = False

    @property
    def address(self) -> str:
        return self.bd_addr

    def describe(self) -> dict[str, Any]:
        return {"ble_address": self.bd_addr, "name": self.name, "hci": self.cfg.hci,
                "mtu": self.cfg.mtu, "reassembly": self.cfg.reassembly}

    # --- life cycle ---------------------------------------------------------------------
    async def open(self) -> None:
        from bumble.device import Device
        from bumble.gatt import Attribute, Characteristic, CharacteristicValue, Service
        from bumble.hci import Address

        self._hci = await open_bumble_hci(self.cfg.hci, label=f"sim-{self.dev.id}")
        self.device = Device.with_hci(self.name, Address(self.bd_addr, Address.RANDOM_DEVICE_ADDRESS),
                                      self._hci.source, self._hci.sink)
        self.device.gatt_server.max_mtu = self.cfg.mtu  # CONFIG_BT_L2CAP_TX_MTU
        self._char = Characteristic(
            SMP_CHARACTERISTIC_UUID,
            Characteristic.Properties.WRITE_WITHOUT_RESPONSE | Characteristic.Properties.NOTIFY,
            Attribute.Permissions.WRITEABLE,
            CharacteristicValue(write=self._on_write),
        )
        self.device.add_service(Service(SMP_SERVICE_UUID, [self._char]))
        self.device.on("connection", self._on_connection)
        await self.device.power_on()

    async def close(self) -> None:
        self._up = False
        for c in list(self._conns.values()):
            self._forget(c)
        if self.device is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.device.power_off(), 2.0)
            self.device = None
        if self._hci is not None:
            with contextlib.suppress(Exception):
                res = self._hci.close()
                if asyncio.iscoroutine(res):
                    await res
            self._hci = None

    def smp_idle(self) -> None:
        """The SMP work queue has nothing left to handle (nothing waits for it on BLE)."""

    async def link_up(self) -> None:
        """Booted: advertise (Zephyr's smp_svr starts advertising once bt_enable is done)."""
        self._up = True
        await self._advertise()

    async def link_down(self) -> None:
        """Reset: let answers already on their way leave, then the radio goes silent."""
        self._up = False
        loop = asyncio.get_running_loop()
        in_pipe = self.dev.rsp_pipe.busy_until - loop.time()
        if in_pipe > 0:
            await asyncio.sleep(min(in_pipe, NOTIFY_DRAIN_S))
        queues = [c.queue.join() for c in self._conns.values() if c.alive]
        if queues:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*queues), NOTIFY_DRAIN_S)
        self.dev.rsp_pipe.clear()
        if self.device is None:
            return
        with contextlib.suppress(Exception):
            await self.device.stop_advertising()
        for c in list(self._conns.values()):
            self._forget(c)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.connection.disconnect(HCI_CONNECTION_TIMEOUT), 2.0)

    async def _advertise(self) -> None:
        from bumble.core import UUID, AdvertisingData

        if self.device is None or not self._up or self._conns:
            return
        flags = (AdvertisingData.FLAGS, bytes([0x06]))  # LE general discoverable, no BR/EDR
        name = (AdvertisingData.COMPLETE_LOCAL_NAME, self.name.encode())
        uuid = (AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                UUID(SMP_SERVICE_UUID).to_bytes())
        ad = bytes(AdvertisingData([flags, name, uuid]))
        sd = b""
        if len(ad) > 31:
            ad = bytes(AdvertisingData([flags, name]))
            sd = bytes(AdvertisingData([uuid]))
        with contextlib.suppress(Exception):
            await self.device.stop_advertising()
        await self.device.start_advertising(
            advertising_data=ad, scan_response_data=sd,
            advertising_interval_min=self.cfg.advertising_interval_ms,
            advertising_interval_max=self.cfg.advertising_interval_ms,
        )
        self.dev.counters["ble_advertising_starts"] += 1

    # --- connections ----------------------------------------------------------------------
    def _on_connection(self, connection: Any) -> None:
        c = _Conn(connection)
        self._conns[connection.handle] = c
        c.sender = asyncio.create_task(self._sender(c), name=f"sim-{self.dev.id}-ble-notify")
        self.dev.counters["ble_connections"] += 1
        self.dev.log.info("ble connected %s", connection.peer_address)
        connection.on("disconnection", lambda reason: self._on_disconnection(c, reason))

    def _forget(self, c: _Conn) -> None:
        c.alive = False
        self._conns.pop(c.connection.handle, None)
        if c.sender is not None and not c.sender.done():
            c.sender.cancel()

    def _on_disconnection(self, c: _Conn, reason: int) -> None:
        was_current = c.alive
        self._forget(c)
        if was_current:
            self.dev.log.info("ble disconnected (reason 0x%02X)", reason)
            self.dev.counters["ble_disconnections"] += 1
        if self._up:  # smp_svr: connection recycled -> advertise again
            task = asyncio.get_running_loop().create_task(self._advertise())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # --- SMP --------------------------------------------------------------------------------
    def _on_write(self, connection: Any, value: bytes) -> None:
        dev = self.dev
        c = self._conns.get(connection.handle)
        if c is None or not c.alive:
            return
        dev.counters["ble_writes"] += 1
        frames: list[bytes] = []
        if not self.cfg.reassembly:
            frames.append(bytes(value))
        else:
            c.buf += value
            if len(c.buf) >= SMP_HEADER:
                need = SMP_HEADER + int.from_bytes(c.buf[2:4], "big")
                if len(c.buf) > need:  # more than the header announced: smp_reassembly drops it
                    dev.counters["bad_ble_packets"] += 1
                    c.buf.clear()
                elif len(c.buf) == need:
                    frames.append(bytes(c.buf))
                    c.buf.clear()
        for frame in frames:
            def reply(rsp: bytes, c: _Conn = c) -> None:
                dev.send_response(rsp, lambda b: self._queue_notify(c, b))

            dev.req_pipe.send(len(frame),
                              lambda f=frame, r=reply: dev.frame_arrived(  # type: ignore[misc]
                                  f, r, limit_in_flight=True,
                                  reserved=1 if self.cfg.reassembly_netbuf else 0),
                              lossy=False)

    def _queue_notify(self, c: _Conn, rsp: bytes) -> None:
        if not c.alive:
            self.dev.counters["ble_responses_dropped"] += 1  # the requester has gone
            return
        c.queue.put_nowait(rsp)

    async def _sender(self, c: _Conn) -> None:
        while True:
            rsp = await c.queue.get()
            try:
                step = max(1, c.connection.att_mtu - ATT_WRITE_OVERHEAD)
                for off in range(0, len(rsp), step):
                    if not c.alive or self.device is None:
                        return
                    try:
                        await self.device.notify_subscriber(c.connection, self._char,
                                                            rsp[off : off + step])
                    except Exception as exc:
                        self.dev.log.debug("ble notify failed: %s", exc)
                        return
                    self.dev.counters["ble_notifications"] += 1
            finally:
                c.queue.task_done()
