"""A minimal LwM2M server over coaps (DTLS with PSK) for the tests: the registration interface
only, on aiocoap's tinydtls server transport.

Wakaama's shared build has no DTLS server, so this peer stands in for the coaps tests. It is
written from the OMA LwM2M Technical Specification (OMA-TS-LightweightM2M-V1_0 / V1_1, "Client
Registration Interface" and its CoAP mapping), not from the gateway's code:

* Register: ``POST /rd?ep={Endpoint Client Name}&lt={Lifetime}&lwm2m={version}&b={binding}``
  with the object links (CoRE Link Format, ct 40) -> ``2.01 Created`` with the registration's
  ``Location-Path`` (``/rd/<id>``); the endpoint name is mandatory (else 4.00). A second
  Register with the same endpoint name replaces the first registration.
* Update: ``POST /rd/<id>`` (optionally ``lt``, ``b``, links) -> ``2.04 Changed``; an unknown
  registration -> ``4.04 Not Found`` (the client then registers again).
* De-register: ``DELETE /rd/<id>`` -> ``2.02 Deleted``; unknown -> 4.04.

Security: DTLS 1.2 with a pre-shared key (the spec's PSK mode, Security object resource 2 =
0). ``psks`` maps PSK identity -> key; a handshake with an unknown identity or another key fails
in tinydtls and no request reaches the resources. Each registration records the PSK identity
the DTLS session authenticated (aiocoap's ``authenticated_claims``), so a test can check that
the client registered over the secured session and as whom. It also keeps each Register's
remote, so a test can send requests back to the client over the same DTLS session (the
server -> client direction of LwM2M).

The transport is enabled explicitly (``transports=["tinydtls_server"]``): it serves coaps only
on the bound address, never plain CoAP.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap.numbers.codes import Code
from aiocoap.transports import tinydtls_server
from lwm2m_server import free_udp_port


async def _recognize_remote(self: Any, remote: Any) -> bool:
    # aiocoap 0.4's DTLS server recognises only plain addresses as its own (its FIXME: "never
    # tested"), so a request to a client over the client's DTLS session finds no interface.
    # The test peer needs that direction (LwM2M servers read and write the client), so it
    # recognises its own DTLS sessions too.
    return isinstance(remote, tinydtls_server._AddressDTLS) and remote._protocol is self._pool


tinydtls_server.MessageInterfaceTinyDTLSServer.recognize_remote = _recognize_remote  # type: ignore[method-assign]


@dataclass
class Registration:
    rid: str
    ep: str
    lifetime: int
    query: dict[str, str]
    links: str
    identity: Any  # the credentials entry the DTLS session authenticated (aiocoap claims)
    remote: Any  # the client's DTLS session (requests to the client go on it)
    updates: int = 0


@dataclass
class DtlsLwm2mServer:
    psks: dict[str, bytes]
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_udp_port)
    regs: dict[str, Registration] = field(default_factory=dict)  # id -> registration
    log: list[tuple[str, str]] = field(default_factory=list)  # (operation, endpoint or id)
    ctx: aiocoap.Context | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _next: int = 0

    @property
    def url(self) -> str:
        return f"coaps://{self.host}:{self.port}"

    async def __aenter__(self) -> DtlsLwm2mServer:
        site = resource.Site()
        rd = _Rd(self)
        site.add_resource(["rd"], rd)  # /rd/<id> (PathCapable: a subsite)
        site.add_resource(["rd"], _RdRoot(rd))  # /rd itself
        creds = aiocoap.credentials.CredentialsMap()
        creds.load_from_dict({f":{ident}": {"dtls": {"psk": {"hex": key.hex()},
                                                     "client-identity": {"ascii": ident}}}
                              for ident, key in self.psks.items()})
        # (aiocoap's DTLS server binds the given port + 1: the coaps default is coap's + 1)
        self.ctx = await aiocoap.Context.create_server_context(
            site, bind=(self.host, self.port - 1), transports=["tinydtls_server"],
            server_credentials=creds)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ctx is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ctx.shutdown(), 5)

    async def _note(self, op: str, what: str) -> None:
        async with self._changed:
            self.log.append((op, what))
            self._changed.notify_all()

    async def wait(self, op: str, what: str, within: float = 20.0) -> None:
        async def find() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: (op, what) in self.log)
        await asyncio.wait_for(find(), within)

    def by_ep(self, ep: str) -> Registration | None:
        return next((r for r in self.regs.values() if r.ep == ep), None)

    async def request(self, reg: Registration, code: Code, path: str,
                      within: float = 10.0) -> aiocoap.Message:
        """A request to the client over its DTLS session (e.g. a Read of /5/0/3)."""
        assert self.ctx is not None
        msg = aiocoap.Message(code=code, uri_path=tuple(path.strip("/").split("/")))
        msg.remote = reg.remote
        return await asyncio.wait_for(self.ctx.request(msg).response, within)


class _RdRoot(resource.Resource):
    def __init__(self, rd: _Rd) -> None:
        super().__init__()
        self.rd = rd

    async def render_post(self, req: aiocoap.Message) -> aiocoap.Message:
        return await self.rd.render_post(req)


def _query(req: aiocoap.Message) -> dict[str, str]:
    out = {}
    for q in req.opt.uri_query:
        k, _, v = q.partition("=")
        out[k] = v
    return out


class _Rd(resource.Resource, resource.PathCapable):
    """``/rd``: Register (POST); ``/rd/<id>``: Update (POST) and De-register (DELETE)."""

    def __init__(self, srv: DtlsLwm2mServer) -> None:
        super().__init__()
        self.srv = srv

    async def render_post(self, req: aiocoap.Message) -> aiocoap.Message:
        if req.opt.uri_path:
            return await self._update(req)
        q = _query(req)
        ep = q.get("ep")
        if not ep:
            return aiocoap.Message(code=Code.BAD_REQUEST, payload=b"ep is mandatory")
        for rid in [r.rid for r in self.srv.regs.values() if r.ep == ep]:
            del self.srv.regs[rid]
        self.srv._next += 1
        rid = str(self.srv._next)
        claims = list(getattr(req.remote, "authenticated_claims", []) or [])
        self.srv.regs[rid] = Registration(
            rid, ep, int(q.get("lt", "86400")), q, req.payload.decode(errors="replace"),
            claims[0] if claims else None, req.remote)
        await self.srv._note("register", ep)
        return aiocoap.Message(code=Code.CREATED, location_path=("rd", rid))

    async def _update(self, req: aiocoap.Message) -> aiocoap.Message:
        reg = self.srv.regs.get(req.opt.uri_path[0]) if len(req.opt.uri_path) == 1 else None
        if reg is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        reg.updates += 1
        reg.remote = req.remote
        await self.srv._note("update", reg.ep)
        return aiocoap.Message(code=Code.CHANGED)

    async def render_delete(self, req: aiocoap.Message) -> aiocoap.Message:
        reg = self.srv.regs.get(req.opt.uri_path[0]) if len(req.opt.uri_path) == 1 else None
        if reg is None:
            return aiocoap.Message(code=Code.NOT_FOUND)
        del self.srv.regs[reg.rid]
        await self.srv._note("deregister", reg.ep)
        return aiocoap.Message(code=Code.DELETED)


class UdpRelay(asyncio.DatagramProtocol):
    """A UDP relay between the clients and a server that records every datagram the clients
    send (to check that nothing but DTLS records goes out: no plain-CoAP fallback) and can
    inject a datagram to a client from the address the client sees as the server."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sent: list[bytes] = []  # client -> server, in order
        self.clients: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._opening: set[asyncio.Task[None]] = set()
        self._waiting: dict[tuple[str, int], list[bytes]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    @classmethod
    async def start(cls, upstream: tuple[str, int]) -> UdpRelay:
        loop = asyncio.get_running_loop()
        _, relay = await loop.create_datagram_endpoint(lambda: cls(upstream),
                                                       local_addr=("127.0.0.1", 0))
        return relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(data)
        up = self.clients.get(addr)
        if addr in self._waiting:  # its upstream socket is being opened
            self._waiting[addr].append(data)
        elif up is None:
            self._waiting[addr] = []
            task = asyncio.ensure_future(self._open(addr, data))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        else:
            up.sendto(data)

    async def _open(self, addr: tuple[str, int], first: bytes) -> None:
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, _a: tuple[str, int]) -> None:
                assert relay.transport is not None
                relay.transport.sendto(data, addr)

        loop = asyncio.get_running_loop()
        up, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.upstream)
        self.clients[addr] = up
        for data in [first, *self._waiting.pop(addr, [])]:
            up.sendto(data)

    def inject(self, data: bytes) -> None:
        """``data`` to every client, from the relay's (the 'server's') address."""
        assert self.transport is not None
        for addr in self.clients:
            self.transport.sendto(data, addr)

    def close(self) -> None:
        for up in self.clients.values():
            up.close()
        if self.transport is not None:
            self.transport.close()


def is_dtls_record(data: bytes) -> bool:
    """A DTLS record: content type 20-23 and version 1.0 (fe ff) or 1.2 (fe fd). Plain CoAP
    (RFC 7252) starts with version bits 01: 0x40-0x7f."""
    return len(data) >= 13 and data[0] in (20, 21, 22, 23) and data[1:3] in (b"\xfe\xff",
                                                                             b"\xfe\xfd")
