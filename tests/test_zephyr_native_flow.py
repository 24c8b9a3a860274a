"""The gateway's update flow against real Zephyr 3.4 smp_svr builds (tests/zephyr_native.py).

Each link (UDP ``udp-params``, SMP over the shell UART ``shell-params``, BLE ``ble`` through
Bumble virtual controllers) runs the whole flow once cleanly and once with a fault in the
middle of the upload: UDP - the device process is killed and relaunched (its RAM upload state
is gone: the upload starts again); shell - the same, the PTY re-created under the symlink;
BLE - every LE link dropped (``kill -USR1`` ble_link, the device keeps running: the gateway
reconnects and resumes).

These builds have no MCUboot (``CONFIG_BOOTLOADER_MCUBOOT=n``): the upload, its hash (the
image's SHA-256 TLV, reported by img_mgmt), the test mark (slot 1 ``pending``) and the reset
(the process exits, the kit relaunches it) are real; nothing swaps, so after the reset slot 0
is still 1.0.0. What is asserted is what the device itself reports (trust rule (b)): slot 1
holds exactly the image, pending; and the gateway never calls the update done nor confirms
anything while 1.0.0 still runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from zephyr_native import Images, Kit, make_images

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status, Step
from gateway.mcuboot import parse_image
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport, UdpTransport

pytestmark = [pytest.mark.timeout(180)]

HW = "native_posix_64"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return make_images(tmp_path_factory.mktemp("zn-images"))


@pytest.fixture
def kit(request: pytest.FixtureRequest, tmp_path: Path, images: Images) -> Iterator[Kit]:
    transport, variant = request.param
    k = Kit.start(tmp_path / "run", transport, variant=variant, slot0=images.v1)
    try:
        yield k
    finally:
        k.stop()


def gateway_cfg(tmp: Path, kit: Kit, images: Images) -> Any:
    updates = tmp / "updates"
    updates.mkdir(exist_ok=True)
    (updates / images.v2.name).write_bytes(images.v2.read_bytes())
    (updates / "manifest.yaml").write_text(yaml.safe_dump(
        {"images": [{"file": images.v2.name, "hardware": HW}]}))
    data = {
        "gateway_id": "zn", "state_dir": str(tmp / "state"), "trusted_keys": [str(images.key)],
        "source": {"kind": "local", "path": str(updates), "poll_interval_s": 2},
        "devices": [{"id": "zn", "transport": kit.transport_config(), "hardware": HW,
                     "slot_size": 0x69000, "health_check_s": 0.5,
                     "timeouts": {"reset_s": 30, "request_s": 3.0}}],
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_config(data, path)


async def slot_states(kit: Kit) -> dict[int, Any]:
    """What the device reports (a session of our own after the gateway's pass)."""
    if kit.transport == "ble":
        from gateway.config import BleTransport
        from gateway.smp.ble import BleLink

        tr: Any = BleLink(BleTransport.model_validate(kit.transport_config()))
    elif kit.transport == "udp":
        tr = UdpTransport(kit.env["ZN_UDP_HOST"], int(kit.env["ZN_UDP_PORT"]))
    else:
        tr = SerialTransport(kit.env["ZN_SERIAL_LINK"])
    async with SMPSession(tr, device_id="check", timeout_s=5.0) as s:
        return {int(x.slot): x for x in await s.image_state()}


async def run_flow(tmp: Path, kit: Kit, images: Images, fault: Any = None) -> Any:
    fired: list[int] = []

    def progress(_dev: str, step: str, off: int, total: int) -> None:
        if fault is not None and not fired and step == Step.UPLOAD.value and total and off > total // 3:
            fired.append(off)
            fault(kit)

    gw = Gateway(gateway_cfg(tmp, kit, images), on_progress=progress)
    try:
        res = await gw.run_once()
    finally:
        gw.close()
    if fault is not None:
        assert fired, "the upload never got a third of the way: the fault was not injected"
    return res.outcomes["zn"]


def check_verdict(out: Any, states: dict[int, Any], images: Images) -> None:
    v2 = parse_image(images.v2.read_bytes())
    # (b) the device's own report: slot 1 holds exactly the image, marked for test
    assert states[1].hash == v2.hash and states[1].version == "2.0.0", states
    assert states[1].pending and not states[1].confirmed
    # no MCUboot: 1.0.0 still runs; the gateway must not call that an update or confirm it
    assert states[0].version == "1.0.0" and states[0].active and states[0].confirmed
    assert out.status != Status.UPDATED and not out.ok, out
    assert out.status == Status.FAILED and "did not take the image" in out.detail, out
    assert "1.0.0 runs" in out.detail


LINKS = [pytest.param(("udp", "udp-params"), id="udp"),
         pytest.param(("serial", "shell-params"), id="shell"),
         pytest.param(("ble", "ble"), id="ble")]


@pytest.mark.parametrize("kit", LINKS, indirect=True)
async def test_update_flow_on_the_real_build(kit: Kit, images: Images, tmp_path: Path) -> None:
    launches = kit.launches()
    out = await run_flow(tmp_path, kit, images)
    assert kit.launches() > launches, "the gateway's reset did not restart the device"
    check_verdict(out, await slot_states(kit), images)


def _kill(kit: Kit) -> None:
    kit.kill_zephyr()


def _drop(kit: Kit) -> None:
    kit.drop_ble_links()


@pytest.mark.parametrize(("kit", "fault"), [
    pytest.param(("udp", "udp-params"), _kill, id="udp-device-killed"),
    pytest.param(("serial", "shell-params"), _kill, id="shell-device-killed"),
    pytest.param(("ble", "ble"), _drop, id="ble-link-dropped"),
], indirect=["kit"])
async def test_fault_mid_upload_on_the_real_build(kit: Kit, fault: Any, images: Images,
                                                  tmp_path: Path) -> None:
    launches = kit.launches()
    out = await run_flow(tmp_path, kit, images, fault)
    if fault is _kill:
        assert kit.launches() >= launches + 2  # the kill's relaunch and the gateway's reset
    else:  # the device kept its upload state: the gateway reconnected and resumed
        assert out.resumed_from > 0, out
    check_verdict(out, await slot_states(kit), images)
