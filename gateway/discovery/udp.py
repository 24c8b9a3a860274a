"""UDP discovery: which hosts answer SMP on the SMP port.

Owns probing ``discovery.udp.hosts`` (addresses, names, CIDR ranges) with one SMP echo each
(group 0 cmd 0, the request every smp_svr answers) from a single datagram socket: a thousand
hosts cost a thousand datagrams, not a thousand sockets. Probes are paced at ``probe_rate``
per second and sent twice to the hosts that stay silent (UDP loses datagrams). A host that
answers with a well-formed SMP echo response becomes a candidate; identification then asks it
who it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from typing import Any

from smp import header as smphdr
from smpclient.requests.os_management import EchoWrite

from gateway.config import UdpDiscovery
from gateway.discovery.candidates import Candidate

log = logging.getLogger(__name__)


def expand_hosts(cfg: UdpDiscovery) -> list[str]:
    """Addresses and names of ``cfg.hosts`` with CIDR ranges expanded (ValueError if too many)."""
    out: list[str] = []
    for h in cfg.hosts:
        if "/" in h:
            net = ipaddress.ip_network(h, strict=False)
            if net.num_addresses > cfg.max_hosts + 2:
                raise ValueError(f"discovery.udp.hosts: {h} has {net.num_addresses} addresses, more "
                                 f"than max_hosts ({cfg.max_hosts})")
            hosts = list(net.hosts()) or [net.network_address]
            out.extend(str(a) for a in hosts)
        else:
            out.append(h)
    seen: set[str] = set()
    return [h for h in out if not (h in seen or seen.add(h))]  # type: ignore[func-returns-value]


class _Proto(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: dict[str, tuple[bytes, float]] = {}
        self.waiting: set[str] = set()
        self.all_answered = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < smphdr.Header.SIZE:
            return
        try:
            hdr = smphdr.Header.loads(data[: smphdr.Header.SIZE])
        except Exception:
            return
        if int(hdr.group_id) == 0 and hdr.command_id == 0 and int(hdr.op) == 3:
            self.answers.setdefault(addr[0], (data, time.monotonic()))
            self.waiting.discard(addr[0])
            if not self.waiting:
                self.all_answered.set()

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: that host is silent
        pass


async def _resolve(host: str, port: int) -> str | None:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        log.info("discovery: cannot resolve %s: %s", host, exc)
        return None
    return str(infos[0][4][0]) if infos else None


async def probe(cfg: UdpDiscovery, hosts: list[str] | None = None,
                port: int | None = None) -> list[Candidate]:
    """Candidates for every host of ``hosts`` (default: ``cfg.hosts``) that answers an echo."""
    port = port or cfg.port
    names = hosts if hosts is not None else expand_hosts(cfg)
    resolved: dict[str, str] = {}
    for name in names:
        addr = await _resolve(name, port)
        if addr is not None:
            resolved.setdefault(addr, name)
    if not resolved:
        return []
    loop = asyncio.get_running_loop()
    found: dict[str, tuple[str, float]] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        targets = [a for a in resolved if (":" in a) == (family == socket.AF_INET6)]
        if not targets:
            continue
        transport, proto = await loop.create_datagram_endpoint(_Proto, family=family)
        try:
            sent_at: dict[str, float] = {}
            gap = 1.0 / cfg.probe_rate
            for rnd in range(2):
                todo = [a for a in targets if a not in proto.answers]
                if not todo:
                    break
                proto.waiting = set(todo)
                proto.all_answered.clear()
                t_next = time.monotonic()
                for i, addr in enumerate(todo):
                    pkt = EchoWrite(d="smp-gateway discovery", sequence=(i + rnd) & 0xFF).BYTES
                    sent_at[addr] = time.monotonic()
                    transport.sendto(pkt, (addr, port))
                    t_next += gap
                    delay = t_next - time.monotonic()
                    if delay > 0.002:
                        await asyncio.sleep(delay)
                proto.waiting -= set(proto.answers)
                if proto.waiting:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proto.all_answered.wait(), cfg.probe_timeout_s)
            for addr, (_data, t) in proto.answers.items():
                if addr in sent_at:
                    found[addr] = (resolved.get(addr, addr), t - sent_at[addr])
        finally:
            transport.close()
    out = []
    for addr, (name, rtt) in sorted(found.items()):
        attrs = {"host": addr, "udp_port": str(port), "rtt_ms": f"{rtt * 1000:.1f}"}
        if name != addr:
            attrs["hostname"] = name
        out.append(Candidate("udp", f"{addr}:{port}", {"kind": "udp", "host": addr, "port": port},
                             attrs))
    log.debug("discovery: %d of %d UDP hosts answered on port %d", len(out), len(resolved), port)
    return out
