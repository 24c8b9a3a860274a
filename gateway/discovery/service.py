"""The discovery service: scanners -> identification -> templates -> the set of known devices.

Owns the devices the gateway found by itself (``device_templates:`` + ``discovery:``), their
current address and whether they are present. One ``scan_once`` gathers candidates from every
configured scanner (serial ports, UDP hosts and DNS-SD, BLE adapters), skips the ones no
template could match before talking to them, identifies the rest over SMP (read-only, at most
``concurrency`` at once) and applies the first fully matching template. It answers with the
changes: devices *added* (new, or back after being gone), *moved* (same device, new address:
a board re-enumerated as another tty, a host with a new DHCP lease, a BLE device with a new
private address) and *gone*.

Identity rules:

* a device is what it reports (node name, hardware id, board) plus what its attachment proves
  (USB serial number, a public BLE address) - the *fingerprint*; its id comes from the
  template's id rule;
* an id already known with another fingerprint is a different device (another board on the
  same port, with an id rule that cannot tell them apart): it gets the id ``<id>-<fp8>``, so
  the first device's journal (its test-marked image) is never applied to it;
* ids of ``devices:`` (static) win: a discovered device with such an id is ignored (warned);
* one identity at two attachments at once (two UDP hosts answering as the same device, a
  clone of a board's hardware id): which of them is the device cannot be told from what they
  report, so the id is *quarantined* - no upload, mark or reset to either (the gateway's
  ``session`` refuses it, ``gateway.discovery.guard``), one warning naming every address,
  ``Found.quarantine`` and ``fleet.sqlite`` say why (``status``, ``ctl list``). Its
  attachments are identified again at every scan; when only one still answers as it, that
  one (just re-identified) is the device and the quarantine is lifted (``Changes.released``).
  The decision which physical device gets an image rests on (b) what the devices report and
  (c) the templates - and an identity reported at two places is not trustworthy;
* an attachment that is unchanged since it was identified (same tty node, same UDP address
  still answering) is not asked again, so running sessions are not disturbed; a port held by
  a session is never opened twice (the serial link holds an exclusive lock; an unchanged
  attachment is not opened at all), and a device in a session is never declared gone.

Known devices and their fingerprints persist in ``fleet.sqlite`` (``gateway.opstate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import BleTransport, DeviceConfig, DeviceTemplate, GatewayConfig
from gateway.discovery import ble as ble_scan
from gateway.discovery import serial as serial_scan
from gateway.discovery import udp as udp_scan
from gateway.discovery.candidates import Candidate
from gateway.discovery.identify import DeviceFacts, fingerprint, identify
from gateway.discovery.mdns import MdnsBrowser
from gateway.discovery.templates import RuleError, build_device, pick, prematch
from gateway.opstate import KnownDevice, OpState
from gateway.smp.ble import BleLink
from gateway.smp.session import SMPSession, SMPTimeout
from gateway.smp.transport import SerialTransport, Transport, TransportError, UdpTransport

log = logging.getLogger("gateway.discovery")


@dataclass
class Found:
    config: DeviceConfig
    candidate: Candidate
    facts: DeviceFacts
    template: str
    fingerprint: str
    present: bool = True
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    quarantine: str | None = None  # why no update may touch it now (an identity at two places)
    twins: list[str] = field(default_factory=list)  # the attachment keys of that quarantine


@dataclass
class Changes:
    added: list[DeviceConfig] = field(default_factory=list)
    moved: list[DeviceConfig] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why candidates were not taken
    quarantined: list[str] = field(default_factory=list)  # one identity at several places
    released: list[DeviceConfig] = field(default_factory=list)  # out of quarantine: wake it

    def __bool__(self) -> bool:
        return bool(self.added or self.moved or self.gone or self.quarantined or self.released)

    def summary(self) -> str:
        return (f"added={[d.id for d in self.added]} moved={[d.id for d in self.moved]} "
                f"gone={self.gone} quarantined={self.quarantined} "
                f"released={[d.id for d in self.released]}")


def link_for(cand: Candidate, t: DeviceTemplate | None) -> Transport:
    """A transport to identify ``cand`` with the template's options (baud, line length...)."""
    opts: dict[str, Any] = {}
    if t is not None:
        opts = {"serial": t.serial, "udp": t.udp, "ble": t.ble}[cand.kind]
    tr = {**cand.transport, **opts}
    if cand.kind == "serial":
        return SerialTransport(tr["port"], int(tr.get("baud", 115200)), int(tr.get("line_length", 127)),
                               tr.get("mtu"), tr.get("shell") is True)
    if cand.kind == "udp":
        return UdpTransport(tr["host"], int(tr.get("port", 1337)), int(tr.get("mtu", 1500)))

    return BleLink(BleTransport.model_validate(tr))


class Discovery:
    def __init__(self, cfg: GatewayConfig, ops: OpState | None = None, *,
                 busy: Callable[[str], bool] | None = None) -> None:
        assert cfg.discovery is not None, "Discovery needs a discovery: section"
        self.cfg = cfg
        self.dcfg = cfg.discovery
        self.ops = ops
        self.busy = busy or (lambda device_id: False)
        self.devices: dict[str, Found] = {}
        self._at: dict[str, tuple[str, Any]] = {}  # candidate key -> (device id, attachment stamp)
        self._static = {d.id for d in cfg.devices}
        self._fingerprints: dict[str, str] = {}
        self.wake = asyncio.Event()  # a rescan is wanted (hot-plug, mDNS news, operator)
        self._mdns: MdnsBrowser | None = None
        self._warned: set[str] = set()
        if ops is not None:
            for k in ops.known().values():
                self._fingerprints[k.device_id] = k.fingerprint

    # -- public --------------------------------------------------------------------------
    def present(self) -> list[DeviceConfig]:
        return [f.config for f in self.devices.values() if f.present]

    def quarantined(self, device_id: str) -> str | None:
        """Why ``device_id`` may not be updated now (None: it may)."""
        f = self.devices.get(device_id)
        return f.quarantine if f is not None else None

    def port_of(self, device_id: str) -> str | None:
        """The current serial path of a discovered device (follows re-enumeration)."""
        f = self.devices.get(device_id)
        if f is None or f.config.transport.kind != "serial":
            return None
        return str(f.config.transport.port)

    def rescan(self, why: str = "operator") -> None:
        log.info("discovery: rescan requested (%s)", why)
        self.wake.set()

    async def start(self) -> None:
        u = self.dcfg.udp
        if u is not None and u.mdns and self._mdns is None:
            self._mdns = MdnsBrowser(u.mdns_service, u.mdns_interfaces or None)
            try:
                await self._mdns.start()
            except Exception as exc:  # no multicast here: UDP host probing still works
                log.warning("discovery: DNS-SD browsing unavailable: %s", exc)
                self._mdns = None

    async def collect_mdns(self, quiet_s: float) -> None:
        """For a one-shot scan: let DNS-SD answers arrive until none came for ``quiet_s``."""
        if self._mdns is None:
            return
        while True:
            self._mdns.changed.clear()
            try:
                await asyncio.wait_for(self._mdns.changed.wait(), quiet_s)
            except TimeoutError:
                return

    async def close(self) -> None:
        if self._mdns is not None:
            await self._mdns.close()
            self._mdns = None

    # -- one scan ------------------------------------------------------------------------
    async def gather(self, *, force_ble: bool = False) -> list[Candidate]:
        out: list[Candidate] = []
        d = self.dcfg
        if d.serial is not None:
            out += serial_scan.scan(d.serial)
        if d.udp is not None:
            if d.udp.hosts:
                try:
                    out += await udp_scan.probe(d.udp)
                except (OSError, ValueError) as exc:
                    log.warning("discovery: UDP probe failed: %s", exc)
            if self._mdns is not None:
                have = {c.key for c in out}
                out += [c for c in self._mdns.snapshot() if c.key not in have]
        for b in d.ble:
            try:
                out += await ble_scan.scan(b, force=force_ble)
            except TransportError as exc:
                log.warning("discovery: BLE scan on %s failed: %s", b.adapter, exc)
        return out

    @staticmethod
    def _stamp(c: Candidate) -> Any:
        if c.kind == "serial":
            return (c.address, serial_scan.stamp(c.attrs.get("tty", c.address)))
        return c.address

    async def identify(self, cand: Candidate, t: DeviceTemplate | None) -> DeviceFacts:
        link = link_for(cand, t)
        session = SMPSession(link, device_id=f"discovery:{cand.address}",
                             timeout_s=self.dcfg.identify_timeout_s)
        try:
            await asyncio.wait_for(session.open(), self.dcfg.identify_timeout_s + 10.0)
            return await identify(session, timeout_s=self.dcfg.identify_timeout_s,
                                  os_info_enabled=self.dcfg.identity.os_info,
                                  hwid_format=self.dcfg.identity.hwid_format)
        finally:
            with contextlib.suppress(Exception):
                await session.close()

    async def scan_once(self, *, full: bool = False) -> Changes:
        """Find, identify and classify; ``full`` re-identifies every attachment."""
        ch = Changes()
        cands = await self.gather(force_ble=full)
        seen_keys: set[str] = set()
        claims: dict[str, dict[str, Candidate]] = {}  # device id -> attachments answering as it
        todo: list[tuple[Candidate, DeviceTemplate]] = []
        for c in cands:
            seen_keys.add(c.key)
            prior = self._at.get(c.key)
            stamp = self._stamp(c)
            if (prior is not None and prior[1] == stamp and not full and prior[0] in self.devices
                    and self.devices[prior[0]].quarantine is None):  # quarantined: ask again
                f = self.devices[prior[0]]
                claims.setdefault(prior[0], {})[c.key] = c
                if not f.present:
                    f.present = True
                    ch.added.append(f.config)
                self._touch(prior[0])
                continue
            t = pick(self.cfg.device_templates, c)
            if t is None:
                continue
            todo.append((c, t))
        sem = asyncio.Semaphore(self.dcfg.concurrency)

        async def one(c: Candidate, t: DeviceTemplate) -> tuple[Candidate, DeviceFacts | BaseException]:
            async with sem:
                try:
                    return c, await self.identify(c, t)
                except (TransportError, SMPTimeout, TimeoutError, OSError) as exc:
                    return c, exc

        results = await asyncio.gather(*(one(c, t) for c, t in todo))
        taken: list[tuple[Candidate, DeviceFacts, DeviceConfig, str, str]] = []
        for c, res in results:
            if isinstance(res, BaseException):
                ch.skipped.append(f"{c.address}: not identified: {res}")
                log.info("discovery: %s not identified: %s", c.address, res)
                for dev_id, f in self.devices.items():  # still there, just silent this time:
                    if f.quarantine is not None and c.key in f.twins:  # not a way out of it
                        claims.setdefault(dev_id, {})[c.key] = c
                continue
            r = self._resolve(c, res, ch)
            if r is not None:
                taken.append((c, res, *r))
                claims.setdefault(r[0].id, {})[c.key] = c
        # (b)+(c): one identity at two attachments is no identity: quarantine, do not pick one
        twins = {i: cs for i, cs in claims.items() if len(cs) > 1}
        for c, facts, dev, tname, fp in taken:
            if dev.id not in twins:
                self._take(c, facts, dev, tname, fp, ch)
        for dev_id, cs in twins.items():
            self._quarantine(dev_id, cs, [x for x in taken if x[2].id == dev_id], ch)
        # gone: a present device whose attachment was not seen (and that is not in a session)
        for dev_id, f in self.devices.items():
            if f.present and f.candidate.key not in seen_keys and not self.busy(dev_id):
                f.present = False
                ch.gone.append(dev_id)
                self._persist(f)
                log.info("discovery: device=%s gone from %s", dev_id, f.candidate.address)
        self._forget_old()
        if ch:
            log.info("discovery: %s", ch.summary())
        return ch

    def _touch(self, dev_id: str) -> None:
        f = self.devices[dev_id]
        f.last_seen = time.time()

    def _resolve(self, c: Candidate, facts: DeviceFacts,
                 ch: Changes) -> tuple[DeviceConfig, str, str] | None:
        """The device an identified attachment is (its config, template name, fingerprint);
        None when no template takes it or ``devices:`` owns its id."""
        t = pick(self.cfg.device_templates, c, facts)
        if t is None:
            ch.skipped.append(f"{c.address}: no template matches board={facts.board} node={facts.node}")
            log.info("discovery: %s (board=%s node=%s) matches no template", c.address, facts.board,
                     facts.node)
            return None
        try:
            dev = build_device(t, c, facts)
        except (RuleError, ValueError) as exc:
            ch.skipped.append(f"{c.address}: {exc}")
            log.warning("discovery: %s: %s", c.address, exc)
            return None
        fp = fingerprint(facts, c.attrs)
        old_fp = self._fingerprints.get(dev.id)
        if old_fp and fp and old_fp != fp:
            new_id = f"{dev.id}-{fp[:8]}"
            log.warning("discovery: %s reports another identity than device %s had (fingerprint %s, "
                        "was %s): treating it as a new device %s (the id rule of template %s cannot "
                        "tell them apart; add {usb_serial}, {node} or {hwid} to it)", c.address,
                        dev.id, fp, old_fp, new_id, t.name)
            dev = build_device(t, c, facts, device_id_override=new_id)
        if dev.id in self._static:
            if dev.id not in self._warned:
                self._warned.add(dev.id)
                log.warning("discovery: %s identifies as %s, which devices: configures statically; "
                            "ignored", c.address, dev.id)
            return None
        return dev, t.name, fp

    def _quarantine(self, dev_id: str, cands: dict[str, Candidate],
                    taken: list[tuple[Candidate, DeviceFacts, DeviceConfig, str, str]],
                    ch: Changes) -> None:
        """``dev_id`` answers at every attachment of ``cands``: none of them is trusted."""
        addrs = sorted(c.address for c in cands.values())
        reason = (f"identity {dev_id} answers at {len(addrs)} addresses at once "
                  f"({', '.join(addrs)}): which one is the device cannot be told; no upload, mark "
                  "or reset to any of them until only one answers as it")
        prev = self.devices.get(dev_id)
        if prev is None:  # first seen twice at once: remember it (at one address) to show it
            c, facts, dev, tname, fp = min(taken, key=lambda x: x[0].key)
            self._fingerprints.setdefault(dev_id, fp)
            prev = self.devices[dev_id] = Found(dev, c, facts, tname, fp, False)
        for c in cands.values():
            self._at[c.key] = (dev_id, self._stamp(c))
        if not prev.present:
            prev.present = True
            ch.added.append(prev.config)
        prev.last_seen = time.time()
        if prev.quarantine != reason:
            log.warning("discovery: device=%s quarantined: %s", dev_id, reason)
            ch.quarantined.append(dev_id)
        prev.quarantine = reason
        prev.twins = sorted(cands)
        if self.ops is not None:
            self.ops.quarantine(dev_id, reason)
        self._persist(prev)

    def _take(self, c: Candidate, facts: DeviceFacts, dev: DeviceConfig, tname: str, fp: str,
              ch: Changes) -> None:
        self._fingerprints.setdefault(dev.id, fp)
        prev = self.devices.get(dev.id)
        now = time.time()
        f = Found(dev, c, facts, tname, fp, True,
                  first_seen=prev.first_seen if prev else now, last_seen=now)
        if prev is not None and prev.quarantine is not None:
            log.warning("discovery: device=%s quarantine lifted: only %s answers as it now "
                        "(identified again just now)", dev.id, c.address)
            ch.released.append(dev)
        if self.ops is not None and (prev is None or prev.quarantine is not None):
            self.ops.release(dev.id)  # also a quarantine left by an earlier run
        self.devices[dev.id] = f
        for k, v in list(self._at.items()):
            if v[0] == dev.id and k != c.key:
                del self._at[k]
        owner = self._at.get(c.key, (None, None))[0]
        if owner is not None and owner != dev.id and owner in self.devices:
            # another device answers where ``owner`` was: ``owner`` left that attachment
            of = self.devices[owner]
            if of.present and of.candidate.key == c.key:
                of.present = False
                ch.gone.append(owner)
                self._persist(of)
                log.info("discovery: device=%s gone from %s (another device answers there)", owner,
                         c.address)
        self._at[c.key] = (dev.id, self._stamp(c))
        if prev is None or not prev.present:
            ch.added.append(dev)
            log.info("discovery: device=%s found at %s (template %s, board=%s, fingerprint %s)",
                     dev.id, c.address, tname, facts.board, fp or "-")
        elif prev.config != dev:
            ch.moved.append(dev)
            log.info("discovery: device=%s moved %s -> %s", dev.id, prev.candidate.address, c.address)
        self._persist(f)

    def _persist(self, f: Found) -> None:
        if self.ops is None:
            return
        self.ops.put_known(KnownDevice(f.config.id, f.fingerprint, f.config.model_dump(mode="json"),
                                       f.template, f.candidate.address, f.first_seen, f.last_seen,
                                       f.present))

    def _forget_old(self) -> None:
        limit = time.time() - self.dcfg.forget_after_s
        for dev_id in [i for i, f in self.devices.items() if not f.present and f.last_seen < limit]:
            del self.devices[dev_id]
            if self.ops is not None:
                self.ops.forget(dev_id)

    # -- continuous ----------------------------------------------------------------------
    async def run(self, on_change: Callable[[Changes], Awaitable[None] | None],
                  stop: asyncio.Event | None = None) -> None:
        """Scan at start, on hot-plug/mDNS news/``rescan``, and every ``interval_s``."""
        stop = stop or asyncio.Event()
        await self.start()
        tasks: list[asyncio.Task[None]] = []
        if self.dcfg.serial is not None:
            watcher = serial_scan.SerialWatcher(self.dcfg.serial, lambda why: self.rescan(why))
            tasks.append(asyncio.create_task(watcher.run(), name="discovery-serial-watch"))
        if self._mdns is not None:
            tasks.append(asyncio.create_task(self._relay_mdns(), name="discovery-mdns"))
        try:
            while not stop.is_set():
                self.wake.clear()
                try:
                    ch = await self.scan_once()
                except Exception:
                    log.exception("discovery: scan failed")
                    ch = Changes()
                if ch:
                    res = on_change(ch)
                    if asyncio.iscoroutine(res):
                        await res
                waits = [asyncio.create_task(self.wake.wait()), asyncio.create_task(stop.wait())]
                try:
                    await asyncio.wait(waits, timeout=self.dcfg.interval_s,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await self.close()

    async def _relay_mdns(self) -> None:
        assert self._mdns is not None
        while True:
            await self._mdns.changed.wait()
            self._mdns.changed.clear()
            self.rescan("DNS-SD announcement")


__all__ = ["Changes", "Discovery", "Found", "link_for", "prematch"]
