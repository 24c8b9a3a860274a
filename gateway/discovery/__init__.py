"""Discovery: find MCUs by themselves instead of listing each one in ``gateway.yaml``.

Scanners (``serial``: globs + USB attributes + udev hot-plug; ``udp``: SMP echo probes of hosts
and CIDR ranges; ``mdns``: DNS-SD ``_mcumgr._udp``; ``ble``: advertisements of the SMP service)
produce candidates; ``identify`` asks each what it is over SMP (read-only); ``templates`` turns
a match into a ``DeviceConfig`` with an id from the device's own identity; ``service.Discovery``
keeps the set of devices, their addresses and presence, and reports changes to the scheduler;
``links.FollowingSerialLink`` lets an open session follow a device to its new tty name.
See docs/operations.md.
"""

from gateway.discovery.candidates import Candidate
from gateway.discovery.identify import DeviceFacts, fingerprint, identify
from gateway.discovery.service import Changes, Discovery, Found

__all__ = ["Candidate", "Changes", "DeviceFacts", "Discovery", "Found", "fingerprint", "identify"]
