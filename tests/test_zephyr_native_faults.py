"""Faults in the middle of an upload on the real Zephyr 3.4 smp_svr host builds.

Beside the two of test_zephyr_native_flow.py (the device process killed and relaunched on UDP
and shell, every LE link dropped on BLE), a third of the way into the upload:

* **udp-link-down**: the device's network link goes down for 1.5 s (``ip link set zeth down``
  in its namespace: every datagram either way is lost) and comes back; the device keeps its
  upload state in RAM, so the gateway goes on from the device's own offset: the image is not
  sent again from the start.
* **udp-reset** / **shell-reset**: another SMP client resets the device (``os reset``, group 0
  command 5, as a second tool or an operator would) while the gateway's chunks are in flight;
  the process exits and the kit relaunches it on the same flash file. Its RAM upload state is
  gone and slot 1 holds a partial image: the device answers the next chunk with offset 0 and
  the gateway must start again - never mark what is in slot 1 before the device reports the
  whole image's hash there.

Every case must end in bounded time with the verdict the device itself reports (trust rule
(b)): slot 1 holds exactly the image (the SHA-256 TLV img_mgmt reports), marked pending, and
the gateway does not call the update done (these builds have no MCUboot: 1.0.0 still runs).
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from smp import packet as smppacket
from test_zephyr_native_flow import check_verdict, images, kit, run_flow, slot_states
from zephyr_native import Images, Kit

pytestmark = [pytest.mark.timeout(180)]

__all__ = ["images", "kit"]  # the fixtures of test_zephyr_native_flow.py

RESET = struct.pack("!BBHHBB", 2, 0, 1, 0, 0xA5, 5) + cbor2.dumps({})  # os reset, SMP v1


def _udp_reset(k: Kit) -> None:
    """A second client's ``os reset`` (through the kit's relay, like any tool). With the
    gateway's window on the device's two netbufs a datagram may find none free and is lost
    silently: the client sends again until the device answers (at most 10 tries)."""

    async def reset() -> None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[bytes] = loop.create_future()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not answered.done():
                    answered.set_result(data)

        tr, _ = await loop.create_datagram_endpoint(
            Proto, remote_addr=(k.env["ZN_UDP_HOST"], int(k.env["ZN_UDP_PORT"])))
        try:
            for _ in range(10):
                tr.sendto(RESET)
                try:
                    await asyncio.wait_for(asyncio.shield(answered), 0.3)
                    return
                except TimeoutError:
                    continue
        finally:
            tr.close()

    _tasks.add(asyncio.get_running_loop().create_task(reset()))


_tasks: set[asyncio.Task[None]] = set()


def _shell_reset(k: Kit) -> None:
    """``os reset`` framed for the shell, written by a second opener of the PTY in one write
    (one line: it cannot interleave with a line of the gateway's)."""
    fd = os.open(os.path.realpath(k.env["ZN_SERIAL_LINK"]), os.O_WRONLY | os.O_NOCTTY)
    try:
        os.write(fd, b"".join(smppacket.encode(RESET, line_length=127)))
    finally:
        os.close(fd)


def _link(k: Kit, state: str) -> None:
    subprocess.run(["ip", "netns", "exec", k.env["ZN_NETNS"], "ip", "link", "set", "zeth", state],
                   check=True, timeout=10, capture_output=True)


def _link_down(k: Kit) -> None:
    _link(k, "down")
    asyncio.get_running_loop().call_later(1.5, _link, k, "up")


@pytest.mark.parametrize(("kit", "fault"), [
    pytest.param(("udp", "udp-params"), _link_down, id="udp-link-down"),
    pytest.param(("udp", "udp-params"), _udp_reset, id="udp-reset"),
    pytest.param(("serial", "shell-params"), _shell_reset, id="shell-reset"),
], indirect=["kit"])
async def test_fault_mid_upload_on_the_real_build(kit: Kit, fault: Any, images: Images,
                                                  tmp_path: Path) -> None:
    launches = kit.launches()
    t0 = time.monotonic()
    out = await run_flow(tmp_path, kit, images, fault)
    took = time.monotonic() - t0
    assert took < 60, f"bounded: the pass took {took:.1f}s"
    states = await slot_states(kit)
    check_verdict(out, states, images)  # slot 1 = the whole image, pending (and nothing else)
    size = images.v2.stat().st_size
    if fault is _link_down:
        # the device kept its upload: the gateway went on from its offset, not from 0
        assert kit.launches() == launches + 1, "only the gateway's own reset restarted it"
        assert out.bytes_uploaded < 1.6 * size, out
    else:
        # the second client's reset and the gateway's; the upload started again from 0
        assert kit.launches() >= launches + 2, kit.log()[-2000:]
        assert out.bytes_uploaded > size, out
