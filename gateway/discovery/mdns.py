"""DNS-SD / mDNS discovery of devices that announce their SMP server (``zeroconf``).

Owns browsing one service type, by default ``_mcumgr._udp.local.`` (our choice: there is no
registered DNS-SD type for MCUmgr; RFC 6763 service names are at most 15 characters after the
underscore, and Zephyr's ``DNS_SD_REGISTER_UDP_SERVICE(id, CONFIG_NET_HOSTNAME, "_mcumgr",
"local", DNS_SD_EMPTY_TXT, port)`` in ``include/zephyr/net/dns_sd.h`` announces exactly this).
Every instance resolved to an address and a port is a UDP candidate; its TXT records become
attributes (``txt_<key>``), so a firmware can announce e.g. ``hw=nrf9160dk`` for templates to
match before any SMP is exchanged.

The browser runs in the background for as long as discovery runs (answers arrive whenever
devices announce themselves); ``snapshot()`` returns what is known now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from gateway.discovery.candidates import Candidate

log = logging.getLogger(__name__)

DEFAULT_SERVICE = "_mcumgr._udp.local."


class MdnsBrowser:
    def __init__(self, service: str = DEFAULT_SERVICE, interfaces: Any = None) -> None:
        self.service = service if service.endswith(".") else service + "."
        self.interfaces = interfaces
        self._azc: Any = None
        self._browser: Any = None
        self._found: dict[str, Candidate] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    async def start(self) -> None:
        from zeroconf import InterfaceChoice
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        kw: dict[str, Any] = {"interfaces": self.interfaces or InterfaceChoice.All}
        self._azc = AsyncZeroconf(**kw)
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, [self.service],
                                            handlers=[self._on_change])
        log.info("discovery: browsing DNS-SD %s", self.service)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            with contextlib.suppress(Exception):
                await self._browser.async_cancel()
            self._browser = None
        if self._azc is not None:
            with contextlib.suppress(Exception):
                await self._azc.async_close()
            self._azc = None

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            if self._found.pop(name, None) is not None:
                self.changed.set()
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, 3000):
            log.info("discovery: DNS-SD %s did not resolve", name)
            return
        addrs = info.parsed_scoped_addresses()
        if not addrs or not info.port:
            return
        host = next((a for a in addrs if ":" not in a), addrs[0])
        attrs = {"host": host, "udp_port": str(info.port),
                 "mdns_name": name[: -len(service_type) - 1] if name.endswith(service_type) else name}
        if info.server:
            attrs["hostname"] = info.server.rstrip(".")
        for k, v in (info.properties or {}).items():
            if isinstance(k, bytes) and isinstance(v, bytes | None):
                with contextlib.suppress(UnicodeDecodeError):
                    attrs[f"txt_{k.decode()}"] = (v or b"").decode()
        self._found[name] = Candidate("udp", f"{host}:{info.port}",
                                      {"kind": "udp", "host": host, "port": info.port}, attrs)
        log.info("discovery: DNS-SD %s at %s:%d", name, host, info.port)
        self.changed.set()

    def snapshot(self) -> list[Candidate]:
        return list(self._found.values())
