"""Is the device at this address the device the journal is about? Checked at every session.

Owns the gateway's identity gate, which every session with a device passes before anything
is read for an update or sent (``Gateway.session``; single devices and every group phase):

* ``before(dev)`` - a discovered device that is quarantined (its identity answers at two
  attachments at once, ``gateway.discovery.service``) is not talked to at all;
* ``check(dev, session)`` - the device is asked who it is (os info node name, board and the
  configured hardware-id letter: ``identify.read_identity``, read-only) and its *fingerprint*
  (``identify.fingerprint``, the rule discovery uses) is compared with the one on record:
  for a discovered device the one discovery identified it by; for a static ``devices:``
  entry the one it reported at its first session (kept in ``fleet.sqlite``). Another board
  at a reused address (a swapped board, a DHCP lease now held by another device) is not the
  journal's device: the session is refused (``IdentityRefused``), so nothing is uploaded,
  marked, reset or confirmed as that device, and ``status`` / ``ctl list`` say why. The same
  board back at the address lifts it.

The decision rests on (b) what the device reports and (c) the configuration (which id an
address belongs to). A device that reports nothing that identifies it (the stock ``smp_svr``
has no os info; MCUboot's serial recovery answers only the image group) gives an empty
fingerprint: there is nothing to compare, and the configured address (c) is all that says
which device it is, as before - unless a board that reported an identity before is on record
for this id: then only MCUboot's serial recovery (which never reports one) passes, anything
else is refused. The check can tell boards apart only where they say who they are, and a
fingerprint is the device's own unsigned words: it catches a swapped board or a reused
address, not a board that copies another's node name and board. The identity is read
with the session's usual bounds (``timeouts.request_s``, 2 retries); no answer is a lost link
(the attempt fails and is retried), never a pass.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.bootmodes.recovery import in_serial_recovery
from gateway.config import DeviceConfig, GatewayConfig, IdentityConfig
from gateway.discovery.identify import fingerprint, read_identity
from gateway.smp.errors import UploadError
from gateway.smp.session import SMPSession

if TYPE_CHECKING:
    from gateway.discovery.service import Discovery
    from gateway.opstate import OpState

log = logging.getLogger("gateway.identity")


class IdentityRefused(UploadError):
    """The device at the address is not (provably) the device the update is for.

    An ``UploadError`` so that every place that turns an attempt's errors into an outcome
    (single devices, group phases) makes it an UPDATE_FAILED outcome with this message, with
    nothing sent to the device."""


def _address(dev: DeviceConfig) -> str:
    t = dev.transport
    if t.kind == "udp":
        return f"{t.host}:{t.port}"
    if t.kind == "serial":
        return str(t.port)
    return str(t.address or t.name)


def _keys(keys: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(keys.items())) or "nothing"


class IdentityGuard:
    def __init__(self, cfg: GatewayConfig, ops: OpState, discovery: Discovery | None) -> None:
        self.ops = ops
        self.discovery = discovery
        self.ident: IdentityConfig = cfg.discovery.identity if cfg.discovery else IdentityConfig()
        self._warned: dict[str, str] = {}

    def before(self, dev: DeviceConfig) -> None:
        """Refuse a quarantined discovered device before any byte goes to it."""
        why = self.discovery.quarantined(dev.id) if self.discovery is not None else None
        if why is not None:
            raise IdentityRefused(f"quarantined: {why}")

    async def check(self, dev: DeviceConfig, session: SMPSession) -> None:
        """Refuse (IdentityRefused) when the device answering is another board than the one
        on record for ``dev.id``; record the first identity of a static device."""
        facts = await read_identity(session, timeout_s=dev.timeouts.request_s, retries=2,
                                    os_info_enabled=self.ident.os_info,
                                    hwid_format=self.ident.hwid_format)
        found = self.discovery.devices.get(dev.id) if self.discovery is not None else None
        fp = fingerprint(facts, found.candidate.attrs if found is not None else {})
        if not fp:  # nothing identifying reported (no os info; MCUboot's serial recovery)
            await self._nothing_reported(dev, session, found)
            return
        if found is not None:
            if found.fingerprint and found.fingerprint != fp:
                assert self.discovery is not None
                self.discovery.rescan(f"{dev.id} answers with another identity")
                raise IdentityRefused(
                    f"{found.candidate.address} now answers as another device ({_keys(facts.keys())}) "
                    f"than {dev.id} was identified as: not updating it as {dev.id}; discovery "
                    "identifies it again")
            return
        rec = self.ops.identity(dev.id)
        if rec is None:  # first session: what identifies this board from now on
            self.ops.put_identity(dev.id, fp, facts.keys())
            log.info("device=%s identity recorded: %s (fingerprint %s)", dev.id,
                     _keys(facts.keys()), fp)
            return
        if rec[0] == fp:
            if self.ops.release(dev.id):
                self._warned.pop(dev.id, None)
                log.warning("device=%s the board on record answers again: quarantine lifted", dev.id)
            return
        reason = (f"the board at {_address(dev)} ({dev.id}'s address) reports "
                  f"{_keys(facts.keys())} (fingerprint {fp}), but {dev.id}'s journal is about the "
                  f"board that reported {_keys(rec[1])} (fingerprint {rec[0]}): not the journal's "
                  f"device, so nothing is uploaded, marked, reset or confirmed as {dev.id}. If the "
                  "board was replaced on purpose, give it its own id in devices: (its own journal)")
        self._refuse(dev, reason)

    async def _nothing_reported(self, dev: DeviceConfig, session: SMPSession,
                                found: object | None) -> None:
        """An empty fingerprint passes only where nothing else was ever on record for this id
        (the configured address (c) is then all that says which device it is), or where the
        device answers from MCUboot's serial recovery (which never reports an identity). A
        board that once said who it was and now says nothing is not the journal's device:
        a hostile or replaced board cannot slip past the check by answering ENOTSUP."""
        rec = self.ops.identity(dev.id) if found is None else None
        if rec is None:
            return
        states = await session.image_state()
        if in_serial_recovery(states):
            return
        self._refuse(dev, f"the board at {_address(dev)} ({dev.id}'s address) reports no "
                          f"identity (no os info), but {dev.id}'s journal is about the board that "
                          f"reported {_keys(rec[1])} (fingerprint {rec[0]}): not provably the "
                          f"journal's device, so nothing is uploaded, marked, reset or confirmed "
                          f"as {dev.id}. If the board was replaced on purpose, give it its own id "
                          "in devices: (its own journal)")

    def _refuse(self, dev: DeviceConfig, reason: str) -> None:
        self.ops.quarantine(dev.id, reason)
        if self._warned.get(dev.id) != reason:
            self._warned[dev.id] = reason
            log.warning("device=%s identity mismatch: %s", dev.id, reason)
        raise IdentityRefused(reason)


__all__ = ["IdentityGuard", "IdentityRefused"]
