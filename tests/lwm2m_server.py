"""A driver for the real Eclipse Wakaama ``lwm2mserver`` (``<shared>/lwm2m/bin``).

The server reads commands on stdin and, with ``-m``, prints one ``#EV`` line per event
(registrations, results, notifications; see ``<shared>/lwm2m/README.md``). ``Wakaama`` starts
it on a free loopback UDP port, parses every ``#EV`` line into an ``Ev`` and lets a test await
the event it wants with a timeout (never a sleep). Where the folder is: ``$SMPGW_SHARED`` or
``<repository>/../shared``, as for Renode; ``wakaama_binary()`` skips a test when it is
absent, and fails it in CI (``CI`` set).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.renode import SHARED_ENV, shared_candidate


def wakaama_binary() -> Path:
    cand, why = shared_candidate()
    path = cand / "lwm2m" / "bin" / "lwm2mserver"
    if not path.is_file():
        msg = (f"LwM2M tests need Wakaama's lwm2mserver: {path} not found ({why}); set "
               f"{SHARED_ENV}=/path/to/shared")
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must provide it)")
        pytest.skip(msg)
    return path


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ev:
    kind: str
    fields: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)

    @property
    def client(self) -> int:
        return int(self.fields["client"])

    @property
    def payload(self) -> bytes:
        return bytes.fromhex(self.fields.get("hex", ""))

    @property
    def code(self) -> str:
        return self.fields.get("code", "")


def parse_ev(line: str) -> Ev | None:
    line = line.strip()
    if not line.startswith("#EV "):
        return None
    parts = line[4:].split(" ")
    ev = Ev(parts[0])
    for p in parts[1:]:
        k, _, v = p.partition("=")
        ev.fields[k] = v
    return ev


def tlv_int(payload: bytes) -> int:
    """The value of a one-resource TLV (``c1 03 02`` ...) or a text payload."""
    if payload and payload[0] >> 6 == 3:
        t = payload[0]
        off = 2 + (1 if t & 0x20 else 0)
        lt = (t >> 3) & 3
        n = t & 7 if lt == 0 else int.from_bytes(payload[off:off + lt], "big")
        off += lt
        return int.from_bytes(payload[off:off + n], "big", signed=True)
    return int(payload.decode())


class Wakaama:
    def __init__(self, port: int | None = None, block_size: int = 1024) -> None:
        self.binary = wakaama_binary()
        self.port = port or free_udp_port()
        self.block_size = block_size
        self.events: list[Ev] = []
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        # the hexdump of every packet the server sends and receives (its stderr), kept to
        # explain a failure: ``hexdump()``
        self._stderr = tempfile.TemporaryFile()  # closed by __aexit__

    def hexdump(self, last: int = 20_000) -> str:
        self._stderr.flush()
        size = self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, size - last))
        return self._stderr.read().decode(errors="replace")

    @property
    def url(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            str(self.binary), "-4", "-a", "127.0.0.1", "-l", str(self.port), "-m",
            "-S", str(self.block_size),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr)
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self.proc = None

    async def __aenter__(self) -> Wakaama:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self._stderr.close()

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                return
            line = raw.decode(errors="replace")
            self.lines.append(line)
            del self.lines[:-2000]
            ev = parse_ev(line)
            if ev is not None:
                async with self._changed:
                    self.events.append(ev)
                    self._changed.notify_all()

    async def cmd(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def mark(self) -> int:
        """A cursor: ``wait(..., since=mark)`` looks only at later events."""
        return len(self.events)

    async def wait(self, pred: Callable[[Ev], bool], within: float = 30.0, since: int = 0) -> Ev:
        async def find() -> Ev:
            i = since
            async with self._changed:
                while True:
                    while i < len(self.events):
                        ev = self.events[i]
                        i += 1
                        if pred(ev):
                            return ev
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(find(), within)
        except TimeoutError:
            tail = "".join(self.lines[-30:])
            raise AssertionError(f"no matching LwM2M server event within {within}s; last "
                                 f"output:\n{tail}") from None

    async def registered(self, ep: str, within: float = 30.0, since: int = 0) -> int:
        ev = await self.wait(lambda e: e.kind in ("REGISTERED", "UPDATED") and e.get("ep") == ep,
                             within, since)
        return ev.client

    async def request(self, line: str, client: int, uri: str, within: float = 30.0) -> Ev:
        """Send a command and await its (final: not a Block1 2.31 Continue) RESULT."""
        m = self.mark()
        await self.cmd(line)
        return await self.wait(lambda e: e.kind == "RESULT" and e.client == client
                               and e.get("uri") == uri and e.code != "2.31", within, m)

    async def read(self, client: int, uri: str, within: float = 30.0) -> Ev:
        return await self.request(f"read {client} {uri}", client, uri, within)

    async def write(self, client: int, uri: str, value: str, within: float = 60.0) -> Ev:
        return await self.request(f"write {client} {uri} {value}", client, uri, within)

    async def exec(self, client: int, uri: str, within: float = 30.0) -> Ev:
        return await self.request(f"exec {client} {uri}", client, uri, within)

    async def observe(self, client: int, uri: str, within: float = 30.0) -> Ev:
        """Start observing; returns the first NOTIFY (the current value)."""
        m = self.mark()
        await self.cmd(f"observe {client} {uri}")
        return await self.wait(lambda e: e.kind == "NOTIFY" and e.client == client
                               and e.get("uri") == uri, within, m)

    async def notified(self, client: int, uri: str, value: int, within: float = 60.0,
                       since: int = 0) -> Ev:
        """The first notification of ``uri`` carrying ``value`` (an integer resource)."""
        def ok(e: Ev) -> bool:
            if e.kind != "NOTIFY" or e.client != client or e.get("uri") != uri:
                return False
            try:
                return tlv_int(e.payload) == value
            except ValueError:
                return False
        return await self.wait(ok, within, since)

    def values(self, client: int, uri: str) -> list[int]:
        """Every integer value notified for ``uri`` so far, in order."""
        out = []
        for e in self.events:
            if e.kind == "NOTIFY" and e.client == client and e.get("uri") == uri and e.payload:
                with contextlib.suppress(ValueError):
                    out.append(tlv_int(e.payload))
        return out
