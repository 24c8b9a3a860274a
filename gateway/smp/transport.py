"""SMP transports: move whole SMP packets between the gateway and one device.

Owns the link: UDP datagrams, SMP serial framing over a UART/PTY, (BLE in ``ble.py``). A
transport only sends and receives complete SMP packets; matching responses to requests,
retries and windows belong to ``session.py``.

These are written here rather than reusing smpclient's transports because those couple
``send`` to ``receive`` for a single request in flight and the serial one polls the port every
5 ms from the event loop; the gateway keeps several requests in flight per device and drives
a thousand devices from one loop, so it needs event-driven, fully asynchronous I/O
(``loop.add_reader`` on the serial fd, a datagram endpoint for UDP). Framing and CRC come
from the ``smp`` package (``smp.packet``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from base64 import b64decode
from typing import Any

from smp import packet as smppacket

log = logging.getLogger(__name__)

IPV4_UDP_OVERHEAD = 28
IPV6_UDP_OVERHEAD = 48


class TransportError(Exception):
    """The link failed (port vanished, permission denied, socket error)."""


class TransportClosed(TransportError):
    """The transport was closed while waiting."""


class Transport(abc.ABC):
    """A bidirectional pipe of whole SMP packets to one device."""

    name = "transport"

    def __init__(self) -> None:
        self._rx: asyncio.Queue[bytes | BaseException] = asyncio.Queue()
        self.bytes_sent = 0  # bytes put on the link, framing included
        self.bytes_received = 0

    @property
    @abc.abstractmethod
    def max_packet(self) -> int:
        """Largest SMP packet (header + CBOR) the link carries in one piece."""

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def send(self, packet: bytes) -> None:
        """Queue one SMP packet for sending; returns when the link accepted it."""

    async def recv(self) -> bytes:
        """The next complete SMP packet received; raises TransportError if the link died."""
        item = await self._rx.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _fresh_rx(self) -> None:
        """Start a connection with an empty queue: drop the close/failure marker of the last one."""
        self._rx = asyncio.Queue()

    def _deliver(self, packet: bytes) -> None:
        self.bytes_received += len(packet)
        self._rx.put_nowait(packet)

    def _fail(self, exc: BaseException) -> None:
        self._rx.put_nowait(exc)

    def link_overhead(self, packet_len: int) -> int:
        """Bytes the link adds around a packet of ``packet_len`` (for efficiency figures)."""
        return 0

    # Bytes of the device's netbuf (MCUmgr ``buf_size``) taken by transport framing next to
    # the SMP packet: 0 for UDP (smp_udp.c copies the datagram), 4 for serial (serial_util.c
    # decodes the frame length and CRC16 into the same netbuf).
    netbuf_overhead = 0

    @property
    def link_rate(self) -> float | None:
        """Bytes per second the link carries, when known (UART: baud / 10); None otherwise.
        The upload uses it to tell serialization time from round-trip time."""
        return None


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._deliver(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable while the device reboots arrives here as ConnectionRefusedError;
        # it is normal during a reset: requests simply time out and are retried.
        log.debug("udp error from %s: %s", self.owner.address, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.owner._fail(TransportError(f"UDP socket closed: {exc}"))


class UdpTransport(Transport):
    """SMP over UDP: one packet per datagram (Zephyr's UDP SMP transport, port 1337)."""

    name = "udp"

    def __init__(self, host: str, port: int, mtu: int = 1500) -> None:
        super().__init__()
        self.host, self.port, self.mtu = host, port, mtu
        self._transport: asyncio.DatagramTransport | None = None
        self._ipv6 = ":" in host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_packet(self) -> int:
        return self.mtu - (IPV6_UDP_OVERHEAD if self._ipv6 else IPV4_UDP_OVERHEAD)

    def link_overhead(self, packet_len: int) -> int:
        return IPV6_UDP_OVERHEAD if self._ipv6 else IPV4_UDP_OVERHEAD

    async def open(self) -> None:
        self._fresh_rx()
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), remote_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise TransportError(f"cannot reach {self.address} over UDP: {exc.strerror or exc}") from exc
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._ipv6 = sock.family == socket.AF_INET6

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._fail(TransportClosed("closed"))

    async def send(self, packet: bytes) -> None:
        if self._transport is None:
            raise TransportClosed("UDP transport is not open")
        self._transport.sendto(packet)
        self.bytes_sent += len(packet) + self.link_overhead(len(packet))


class SerialDeframer:
    """Incremental decoder of SMP serial frames from a byte stream (console text is skipped).

    ``smp.packet.decode`` reassembles one frame from lines handed to it; this class finds the
    lines in a raw stream, drops anything that is not an SMP line (a shared console UART prints
    logs between frames) and restarts cleanly after a corrupt frame.
    """

    def __init__(self, max_frame: int = 65536) -> None:
        self._buf = bytearray()
        self._frame: bytearray | None = None
        self._expected = 0
        self.max_frame = max_frame
        self.errors = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > 4 * self.max_frame:  # garbage without newlines
                    self._buf.clear()
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            pkt = self._line(line.rstrip(b"\r"))
            if pkt is not None:
                out.append(pkt)

    def _line(self, line: bytes) -> bytes | None:
        start = line.find(smppacket.START_DELIMITER)
        cont = line.find(smppacket.CONTINUE_DELIMITER)
        try:
            if start >= 0 and (cont < 0 or start < cont):
                raw = b64decode(line[start + 2 :], validate=True)
                if len(raw) < 2:
                    raise ValueError("short frame")
                (self._expected,) = struct.unpack_from("!H", raw)
                if self._expected > self.max_frame:
                    raise ValueError("frame too large")
                self._frame = bytearray(raw[2:])
            elif cont >= 0 and self._frame is not None:
                self._frame += b64decode(line[cont + 2 :], validate=True)
            else:
                return None
        except ValueError:
            self.errors += 1
            self._frame = None
            return None
        if len(self._frame) < self._expected:
            return None
        frame, self._frame = bytes(self._frame[: self._expected]), None
        body, crc = frame[:-2], frame[-2:]
        if len(frame) < 2 or struct.unpack("!H", crc)[0] != smppacket.crc16_func(body):
            self.errors += 1
            return None
        return body


class SerialTransport(Transport):
    """SMP over a UART (or a PTY): base64 lines with CRC16, ``smp.packet`` framing.

    pyserial configures the port (baud, raw mode, exclusive lock so two processes can never
    talk to one device at once); reads and writes then run on the event loop with
    ``add_reader``/``add_writer`` on the file descriptor.

    Framing facts the upload tuning relies on (``tuning.serial_lines``): ``smp.packet.encode``
    puts ``((line_length - 4) // 4) * 4`` base64 characters on a line between a 2-byte
    delimiter and ``\\n``, so ``line_length`` 127 makes lines of at most 123 bytes. That fits
    Zephyr's receive buffers: ``uart_mcumgr.c`` stores a line of up to
    ``CONFIG_UART_MCUMGR_RX_BUF_SIZE`` (128) bytes with its ``\\n`` and drops a longer one,
    ``smp_shell.c`` keeps 127 bytes per line buffer. The frame itself (2-byte length, packet,
    CRC16) is decoded into one netbuf (``serial_util.c``): ``netbuf_overhead`` below.
    """

    name = "serial"

    def __init__(self, port: str, baud: int = 115200, line_length: int = 127,
                 mtu: int | None = None, shell: bool = False) -> None:
        super().__init__()
        self.port, self.baud, self.line_length, self.mtu = port, baud, line_length, mtu
        self.shell = shell  # SMP over the Zephyr shell (smp_shell.c): tuning starts at its MTU
        self._serial: Any = None
        self._fd = -1
        self._deframer = SerialDeframer()
        self._wbuf = bytearray()
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def address(self) -> str:
        return self.port

    @property
    def max_packet(self) -> int:
        # the frame length field is 16 bits; without a configured cap the device's
        # MCUmgr buf_size (applied by the session) is the real limit
        return self.mtu if self.mtu is not None else 0xFFFF - 4

    def link_overhead(self, packet_len: int) -> int:
        framed = sum(len(x) for x in smppacket.encode(b"\0" * packet_len, self.line_length))
        return framed - packet_len

    netbuf_overhead = 4

    @property
    def link_rate(self) -> float | None:
        return self.baud / 10  # 8N1: 10 bit times per byte

    async def open(self) -> None:
        import serial

        self._fresh_rx()
        self._deframer = SerialDeframer()
        try:
            s = serial.Serial()
            s.port = self.port
            s.baudrate = self.baud
            s.timeout = 0
            s.write_timeout = 0
            s.exclusive = True
            s.open()
        except serial.SerialException as exc:
            raise TransportError(_explain_serial_error(self.port, exc)) from exc
        self._serial = s
        self._fd = s.fileno()
        os.set_blocking(self._fd, False)
        with contextlib.suppress(Exception):
            s.reset_input_buffer()
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:  # PTY master gone / USB unplugged
                self._teardown()
                self._fail(TransportError(f"{self.port}: device disconnected (EIO)"))
                return
            raise
        if not data:
            self._teardown()
            self._fail(TransportError(f"{self.port}: end of file"))
            return
        self.bytes_received += len(data)
        for pkt in self._deframer.feed(data):
            self._rx.put_nowait(pkt)

    def _on_writable(self) -> None:
        try:
            n = os.write(self._fd, self._wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._teardown()
            self._fail(TransportError(f"{self.port}: write failed: {exc.strerror}"))
            self._drained.set()
            return
        del self._wbuf[:n]
        if not self._wbuf:
            asyncio.get_running_loop().remove_writer(self._fd)
            self._drained.set()

    async def send(self, packet: bytes) -> None:
        if self._fd < 0:
            raise TransportClosed(f"{self.port} is not open")
        data = b"".join(smppacket.encode(packet, self.line_length))
        self.bytes_sent += len(data)
        if not self._wbuf:
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise TransportError(f"{self.port}: write failed: {exc.strerror}") from exc
            data = data[n:]
            if not data:
                return
            self._drained.clear()
            asyncio.get_running_loop().add_writer(self._fd, self._on_writable)
        self._wbuf += data
        await self._drained.wait()
        if self._fd < 0:
            raise TransportError(f"{self.port}: closed while writing")

    def _teardown(self) -> None:
        if self._fd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
            self._fd = -1
        if self._serial is not None:
            with contextlib.suppress(Exception):
                self._serial.close()
            self._serial = None
        self._drained.set()

    async def close(self) -> None:
        self._teardown()
        self._fail(TransportClosed("closed"))


def _explain_serial_error(port: str, exc: Exception) -> str:
    err = getattr(exc, "errno", None)
    text = str(exc)
    if err == errno.ENOENT or "No such file" in text:
        return f"serial port {port} does not exist (is the device plugged in? check `ls /dev/tty*`)"
    if err == errno.EACCES or "Permission denied" in text:
        return (f"permission denied on {port}: add the gateway's user to the 'dialout' group "
                "(the systemd unit does this with SupplementaryGroups=dialout)")
    if "exclusively lock" in text or err in (errno.EAGAIN, errno.EWOULDBLOCK):
        return (f"serial port {port} is in use by another process (minicom, screen, another "
                f"smp-gateway...): close it; `fuser -v {port}` shows which")
    return f"cannot open serial port {port}: {text}"
