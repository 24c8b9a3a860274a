"""BLE on the real Zephyr ``ble`` host build (tests/zephyr_native.py): what the operator reads.

* A device that does not advertise ends with the scan's own reason - "no advertisement from
  <name/address> within Ns on <adapter>" - even when ``timeouts.connect_s`` is no longer than
  the scan (it used to cut the scan short: ``TransportError: cannot open link: `` with an empty
  reason).
* The adapter is named per backend: bleak's BlueZ adapter (hci0), bumble's HCI transport spec
  (never "hci0", which the bumble backend does not use) unless a label is configured.
* ``-v`` is the gateway's debug log without Bumble's per-packet debug log (which floods the
  log and slows the link); ``--trace-ble`` switches that on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from zephyr_native import Kit

from gateway import cli, devkit
from gateway.config import BleTransport, parse_config
from gateway.daemon import Gateway
from gateway.smp.ble import BleLink, adapter_key

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def ble_kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    k = Kit.start(tmp_path_factory.mktemp("zn-ble") / "run", "ble", variant="ble")
    try:
        yield k
    finally:
        k.stop()


async def test_no_advertisement_is_the_outcome(ble_kit: Kit, tmp_path: Path) -> None:
    hci = ble_kit.env["ZN_BLE_GATEWAY_HCI"]
    updates = tmp_path / "updates"
    updates.mkdir()
    (updates / "manifest.yaml").write_text(yaml.safe_dump({"images": []}))
    data: dict[str, Any] = {
        "gateway_id": "zn", "state_dir": str(tmp_path / "state"),
        "trusted_keys": [str(devkit.make_key(tmp_path / "key.pem"))],
        "source": {"kind": "local", "path": str(updates), "poll_interval_s": 2},
        "devices": [{"id": "ghost", "hardware": "native_posix_64",
                     # the kit's radio has Zephyr on it, but nothing named Ghost
                     "transport": {"kind": "ble", "name": "Ghost", "backend": "bumble",
                                   "hci": hci, "scan_timeout_s": 1.0},
                     "timeouts": {"connect_s": 1.0}}],  # not longer than the scan
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    gw = Gateway(parse_config(data, path))
    try:
        out = await gw.update_device(gw.cfg.devices[0])
    finally:
        gw.close()
    err = out.detail
    assert not out.ok, out
    assert f"no advertisement from name=Ghost within 1s on {hci}" in err, err
    assert "hci0" not in err and not err.rstrip().endswith(":"), err


def test_adapter_named_per_backend() -> None:
    bleak = BleTransport(name="x")
    assert adapter_key(bleak) == "hci0"
    bumble = BleTransport(name="x", backend="bumble", hci="tcp-client:127.0.0.1:9102")
    assert adapter_key(bumble) == "tcp-client:127.0.0.1:9102"
    assert BleLink(bumble).adapter == "tcp-client:127.0.0.1:9102"
    labelled = BleTransport(name="x", backend="bumble", hci="usb:0", adapter="dongle-a")
    assert adapter_key(labelled) == "dongle-a"


def _probe(kit: Kit, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        rc = cli.main(["-v", *extra, "probe", "--ble", kit.env["ZN_BLE_ADDR"], "--backend",
                       "bumble", "--hci", kit.env["ZN_BLE_GATEWAY_HCI"], "--json"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("bumble").setLevel(logging.NOTSET)
    out = capsys.readouterr()
    assert rc == 0, out
    return out.err


def test_verbose_without_bumble_debug_and_trace_ble_with_it(
        ble_kit: Kit, capsys: pytest.CaptureFixture[str]) -> None:
    err = _probe(ble_kit, capsys)
    assert "level=debug logger=gateway" in err  # -v is the gateway's debug log...
    assert "logger=bumble" not in err  # ...without Bumble's per-packet one
    hci = ble_kit.env["ZN_BLE_GATEWAY_HCI"]
    assert f"adapter {hci}" in err and "hci0" not in err, err
    traced = _probe(ble_kit, capsys, "--trace-ble")
    assert "level=debug logger=bumble" in traced
