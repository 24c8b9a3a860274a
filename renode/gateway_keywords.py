"""Robot Framework keywords for ``smp_gateway.robot``: work folders, imgtool, the gateway's
reports and journal, and an independent SMP client (smpclient) to check the device.

The suite runs under ``renode-test`` (Renode's keywords drive the emulated board); everything
the gateway side needs is here, in Python, so that a failure says what was expected. Images are
signed with MCUboot's own ``imgtool`` from the firmware folder's ``smp_svr-unsigned.bin``
exactly as its README says; the device is read with ``smpclient`` (the library smpmgr is built
on), never with the gateway's own SMP code, so the checks do not share the code under test.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from robot.api import logger
from robot.api.deco import keyword

HERE = Path(__file__).resolve().parent
SLOT_SIZE = 0x40000  # stm32f4_disco: slot0 0x08040000, slot1 0x08080000, 256 KiB each


def _imgtool(*args: str) -> str:
    cmd = [sys.executable, "-c", "import imgtool.main as m; m.imgtool()", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"imgtool {' '.join(args)} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


@keyword("Firmware Dir")
def firmware_dir(name: str = "stm32f4_disco") -> str:
    """``$SMPGW_SHARED/firmware/<name>`` (or ``../shared``), see ``gateway/renode.py``."""
    from gateway.renode import firmware_dir as fw

    return str(fw(name))


@keyword("Prepare Work Dir")
def prepare_work_dir(root: str, name: str, config: str, firmware: str) -> str:
    """A fresh folder for one test: the gateway config ``renode/<config>`` as ``gateway.yaml``,
    the firmware's signing key in ``keys/``, an empty ``updates/``. Returns its path."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    work = Path(root) / safe
    if work.exists():
        shutil.rmtree(work)
    (work / "keys").mkdir(parents=True)
    (work / "updates").mkdir()
    shutil.copy(HERE / config, work / "gateway.yaml")
    shutil.copy(Path(firmware) / "signing-key.pem", work / "keys" / "signing-key.pem")
    if any(c.isspace() for c in str(work)):
        raise AssertionError(f"{work}: Renode monitor paths may not contain spaces")
    return str(work)


@keyword("Make Key")
def make_key(path: str) -> str:
    """``imgtool keygen -t ecdsa-p256``: a key this MCUboot was not built with."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _imgtool("keygen", "-k", path, "-t", "ecdsa-p256")
    return path


def _sign(firmware: str, key: str, version: str, out: str, *extra: str) -> str:
    """``imgtool sign`` of the firmware folder's ``smp_svr-unsigned.bin`` (it already holds the
    0x200-byte header area: no ``--pad-header``), with ``extra`` options."""
    _imgtool("sign", "--key", key, "--header-size", "0x200", "--align", "8",
             "--slot-size", hex(SLOT_SIZE), *extra, "--version", version,
             str(Path(firmware) / "smp_svr-unsigned.bin"), out)
    return out


@keyword("Sign Image")
def sign_image(firmware: str, key: str, version: str, out: str) -> str:
    """An upload candidate (not confirmed, not padded)."""
    return _sign(firmware, key, version, out)


@keyword("Sign Padded Confirmed Image")
def sign_padded_confirmed_image(firmware: str, key: str, version: str, out: str) -> str:
    """``imgtool sign --pad --confirm`` with a trusted key: the signed image followed by
    MCUboot's trailer with image_ok set up to the slot's end - uploaded whole, it would be a
    *permanent* install request (review finding 2)."""
    return _sign(firmware, key, version, out, "--max-sectors", "16", "--pad", "--confirm")


@keyword("Image Hash")
def image_hash(path: str, key: str | None = None) -> str:
    """The image's SHA-256 as its TLV states it (what ``image state`` reports), via imgtool.
    With ``key``, also checks that the signature verifies with it."""
    from imgtool import image as imgtool_image
    from imgtool import keys as imgtool_keys

    k = imgtool_keys.load(key) if key else None
    ret, _version, digest, *_ = imgtool_image.Image.verify(path, k)
    if key and ret != imgtool_image.VerifyResult.OK:
        raise AssertionError(f"{path} does not verify with {key}: {ret}")
    return bytes(digest).hex()


@keyword("Publish Image")
def publish_image(work: str, image: str, hardware: str = "stm32f4_disco") -> None:
    """The local update source: ``updates/`` gets the image and a manifest naming it."""
    dst = Path(work) / "updates" / Path(image).name
    shutil.copy(image, dst)
    (Path(work) / "updates" / "manifest.yaml").write_text(
        f"images: [{{file: {dst.name}, hardware: {hardware}}}]\n")


@keyword("Gateway Command")
def gateway_command() -> list[str]:
    """``python -m gateway.cli`` of this interpreter (the one that runs the suite)."""
    return [sys.executable, "-m", "gateway.cli"]


# -- what the gateway reported ---------------------------------------------------------------
@keyword("Last Report")
def last_report(work: str) -> dict[str, Any]:
    """The last finished report the local source wrote (``updates/reports.jsonl``)."""
    path = Path(work) / "updates" / "reports.jsonl"
    if not path.exists():
        raise AssertionError(f"{path}: the gateway reported no outcome")
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    logger.info(f"reports: {lines}")
    return lines[-1]


@keyword("Report Should Be")
def report_should_be(work: str, result: int, *details: str) -> dict[str, Any]:
    """The last report has LwM2M Update Result ``result`` and its detail contains each text."""
    rep = last_report(work)
    if int(rep["result"]) != int(result):
        raise AssertionError(f"reported LwM2M result {rep['result']} ({rep['result_name']}), "
                             f"expected {result}; detail: {rep['detail']}")
    for d in details:
        if d.lower() not in rep["detail"].lower():
            raise AssertionError(f"report detail lacks {d!r}: {rep['detail']}")
    return rep


@keyword("Outcome Line")
def outcome_line(stdout: str, device: str = "disco") -> dict[str, str]:
    """Parse ``device=… result=… lwm2m_result=… wire_bytes=… image_bytes=… detail="…"``
    from ``run --once``."""
    m = re.search(rf'^device={re.escape(device)} (.*)$', stdout, re.M)
    if m is None:
        raise AssertionError(f"no outcome line for {device} in the gateway's output:\n{stdout[-3000:]}")
    fields = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', m.group(1)))
    return {k: v.strip('"') for k, v in fields.items()}


@keyword("Upload Resumed From")
def upload_resumed_from(stdout: str, device: str = "disco") -> int:
    """``resumed_from`` of the engine's ``upload done`` log line."""
    m = re.search(rf"device={re.escape(device)} upload done image_bytes=(\d+) resumed_from=(\d+)", stdout)
    if m is None:
        raise AssertionError(f"no 'upload done' line for {device}:\n{stdout[-3000:]}")
    return int(m.group(2))


@keyword("Journal Upload Offset")
def journal_upload_offset(work: str, device: str = "disco") -> int:
    """The acknowledged upload offset the gateway last checkpointed (read-only SQLite)."""
    db = Path(work) / "state" / "journal.sqlite"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT upload_offset, step FROM devices WHERE device_id = ?",
                          (device,)).fetchone()
    except sqlite3.OperationalError:
        return 0  # the gateway is creating its tables
    finally:
        con.close()
    return int(row[0]) if row and row[1] == "upload" else 0


@keyword("Wait For Upload Offset")
def wait_for_upload_offset(work: str, at_least: int, timeout: float = 600,
                           device: str = "disco") -> int:
    """Wait until the journal checkpoints an acknowledged offset >= ``at_least``."""
    deadline = time.monotonic() + float(timeout)
    off = 0
    while time.monotonic() < deadline:
        off = journal_upload_offset(work, device)
        if off >= int(at_least):
            logger.info(f"journal upload_offset={off}")
            return off
        time.sleep(0.2)  # the journal is a file: no event to await
    raise AssertionError(f"upload did not reach {at_least} bytes within {timeout}s (at {off})")


# -- the device, read with smpclient -----------------------------------------------------------
async def _image_state(port: str, timeout_s: float) -> list[dict[str, Any]]:
    from smp import error as smperr
    from smpclient import SMPClient
    from smpclient.requests.image_management import ImageStatesRead
    from smpclient.transport.serial import SMPSerialTransport

    client = SMPClient(SMPSerialTransport(), port, timeout_s=timeout_s)
    await client.connect()
    try:
        rsp = await client.request(ImageStatesRead())
    finally:
        await client.disconnect()
    if isinstance(rsp, smperr.ErrorV1 | smperr.ErrorV2):
        raise AssertionError(f"image state read refused: {rsp}")
    out = []
    for s in rsp.images:  # type: ignore[union-attr]
        out.append({"image": s.image or 0, "slot": s.slot, "version": s.version,
                    "hash": bytes(s.hash).hex() if s.hash else None,
                    "active": bool(s.active), "confirmed": bool(s.confirmed),
                    "pending": bool(s.pending), "permanent": bool(s.permanent)})
    return out


@keyword("Device Image State")
def device_image_state(port: str, timeout: float = 10, attempts: int = 3) -> list[dict[str, Any]]:
    """Both slots as the device reports them (SMP image state read through smpclient)."""
    last: Exception | None = None
    for _ in range(int(attempts)):
        try:
            slots = asyncio.run(_image_state(port, float(timeout)))
            logger.info(f"image state: {slots}")
            return slots
        except (TimeoutError, OSError, ConnectionError) as exc:
            last = exc
    raise AssertionError(f"no image state from {port}: {last!r}")


@keyword("Slot Should Hold")
def slot_should_hold(port: str, slot: int, version: str, hash_: str | None = None,
                     **flags: str) -> dict[str, Any]:
    """e.g. ``Slot Should Hold  ${PTY}  0  2.0.0  ${hash}  active=True  confirmed=True``."""
    slots = device_image_state(port)
    got = next((s for s in slots if s["slot"] == int(slot)), None)
    if got is None:
        raise AssertionError(f"slot {slot} is empty: {slots}")
    if got["version"] != version or (hash_ and got["hash"] != hash_.lower()):
        raise AssertionError(f"slot {slot} holds {got['version']} {got['hash']}, expected "
                             f"{version} {hash_ or ''}: {slots}")
    for k, v in flags.items():
        want = str(v).lower() in ("true", "1", "yes")
        if got[k] != want:
            raise AssertionError(f"slot {slot} {k}={got[k]}, expected {want}: {slots}")
    return got


@keyword("Slot Should Be Empty")
def slot_should_be_empty(port: str, slot: int) -> None:
    slots = device_image_state(port)
    if any(s["slot"] == int(slot) for s in slots):
        raise AssertionError(f"slot {slot} is not empty: {slots}")


@keyword("File Word")
def file_word(path: str, offset: int) -> int:
    """Little-endian 32-bit word of a file (compare with ``sysbus ReadDoubleWord``)."""
    data = Path(path).read_bytes()[int(offset):int(offset) + 4]
    return int.from_bytes(data, "little")
