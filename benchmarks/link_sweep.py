"""Upload sweep on every real link in one run: Zephyr 3.4 smp_svr host builds over UDP (stock
and params builds), the shell UART and BLE, and (``renode`` in ``--links``) MCUboot + smp_svr
on Renode's UART.

The builds and their scripts are ``../shared/zephyr-native`` (``$SMPGW_SHARED``; driver:
``tests/zephyr_native.py``). For each link, against the same device process, one after the
other (images alternate 2.0.0 / 3.0.0, so no upload resumes another):

* **fixed**: every (chunk, window) pair of the grid, with no discovery (``fixed=True``);
* **tuned cold / warm**: the self-tuned upload with a fresh ``MemoryStore``, then again with
  what the first one learned (a gateway with its journal);
* **baseline**: ``smpmgr image upload`` where it reaches the device (UDP: ``--ip``, serial:
  ``--port``; ``--smpmgr PATH``, default the one next to this Python; its CLI start-up
  included, so a lower bound of its speed), on BLE the fixed pair (largest chunk, window 1).
* **renode**: delegated to ``benchmarks/renode_upload.py`` (the same grid, tuned cold/warm and
  smpmgr on the emulated STM32F4 UART; its own table in docs/benchmarks.md).

Columns: kB/s (image bytes / upload seconds), % re-sent (data bytes sent twice), and the ratio
to the best fixed pair of that link. The machine is shared: compare within one run.

    python benchmarks/link_sweep.py [--links udp-stock,udp-params,shell,ble,renode]
                                    [--chunks 512,1024,2400] [--windows 1,2,3] [--size 65536]
                                    [--smpmgr PATH] [--note TEXT] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import table, update_doc
from zephyr_native import Kit, make_images

from gateway import devkit
from gateway.config import BleTransport
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport, Transport, UdpTransport
from gateway.smp.tuning import MemoryStore
from gateway.smp.upload import WindowedUpload

VARIANT = {"udp-stock": ("udp", "udp-stock"), "udp-params": ("udp", "udp-params"),
           "shell": ("serial", "shell-params"), "ble": ("ble", "ble")}
LINKS = "udp-stock,udp-params,shell,ble,renode"


def transport(kit: Kit) -> Transport:
    if kit.transport == "udp":
        return UdpTransport(kit.env["ZN_UDP_HOST"], int(kit.env["ZN_UDP_PORT"]))
    if kit.transport == "serial":
        return SerialTransport(kit.env["ZN_SERIAL_LINK"], shell=True)
    from gateway.smp.ble import BleLink

    return BleLink(BleTransport.model_validate(kit.transport_config()))


async def one(kit: Kit, image: bytes, **kw: Any) -> tuple[float, float, str]:
    async with SMPSession(transport(kit), device_id="sweep", timeout_s=5.0) as s:
        await s.mcumgr_params()
        await s.image_state()  # as the engine does before an upload (seeds the RTT estimate)
        st = await WindowedUpload(s, image, max_stalls=40 if kw.get("fixed") else 8,
                                  deadline_s=120.0, **kw).run()
    return len(image) / st.seconds / 1000, 100 * st.retransmitted_ratio, st.plan


def smpmgr(path: str, kit: Kit, image: Path) -> float | None:
    """``smpmgr image upload`` (its defaults: UDP port 1337, serial lines of 128 x 2)."""
    if kit.transport == "udp":
        assert kit.env["ZN_UDP_PORT"] == "1337"  # smpmgr --ip has no port
        args = ["--ip", kit.env["ZN_UDP_HOST"]]
    elif kit.transport == "serial":
        args = ["--port", os.path.realpath(kit.env["ZN_SERIAL_LINK"])]
    else:
        return None
    t0 = time.monotonic()
    r = subprocess.run([path, *args, "image", "upload", str(image)], capture_output=True,
                       timeout=600, check=False, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        print(f"smpmgr failed ({r.returncode}): {r.stdout[-500:]!r} {r.stderr[-500:]!r}",
              file=sys.stderr)
        return None
    return image.stat().st_size / (time.monotonic() - t0) / 1000


def default_smpmgr() -> str | None:
    near = Path(sys.executable).parent / "smpmgr"
    return os.environ.get("SMPMGR") or (str(near) if near.is_file() else shutil.which("smpmgr"))


def renode(args: argparse.Namespace) -> None:
    """The Renode UART: benchmarks/renode_upload.py with its own packet grid (176, 266, 380: 2, 3
    and 5 base64 lines of uart_mcumgr.c; the link grid's chunks would all be capped to 380, a
    setting that loses lines there, and the device's best setting would not be in the sweep)."""
    cmd = [sys.executable, str(Path(__file__).with_name("renode_upload.py")), "--reps", "1",
           "--windows", ",".join(map(str, args.windows))]
    if args.write:
        cmd.append("--write")
    subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL)


async def sweep(link: str, work: Path, args: argparse.Namespace) -> list[list[str]]:
    imgs = make_images(work / "img", size=args.size)
    v3 = devkit.sign_image(work / "img" / "app-3.0.0.bin", version="3.0.0", key=imgs.key,
                           size=args.size + 2048, slot_size=0x69000)
    images = [imgs.v2.read_bytes(), Path(v3).read_bytes()]
    args.smpmgr_image = [imgs.v2, Path(v3)]
    tr, variant = VARIANT[link]
    kit = Kit.start(work / f"run-{link}", tr, variant=variant, slot0=imgs.v1)
    rows: list[tuple[str, float, float]] = []
    n = 0

    def img() -> bytes:
        nonlocal n
        n += 1
        return images[n % 2]

    try:
        for c in args.chunks:
            for w in args.windows:
                try:
                    kbs, re, _ = await one(kit, img(), window=w, chunk_cap=c, fixed=True)
                    rows.append((f"fixed chunk<={c} window {w}", kbs, re))
                except Exception as exc:  # a pair the device cannot take: recorded as such
                    rows.append((f"fixed chunk<={c} window {w} ({type(exc).__name__})", 0.0, 0.0))
        store = MemoryStore()
        for label in ("tuned cold", "tuned warm"):
            kbs, re, plan = await one(kit, img(), store=store)
            rows.append((f"{label} ({plan.split(' reason')[0]})", kbs, re))
        if link == "ble" or not args.smpmgr:
            kbs, re, _ = await one(kit, img(), window=1, fixed=True)
            rows.append(("baseline: fixed largest chunk, window 1", kbs, re))
        else:
            n += 1  # the image the last upload did not send (no resume, no match)
            v = smpmgr(args.smpmgr, kit, Path(args.smpmgr_image[n % 2]))
            rows.append(("smpmgr image upload (CLI start-up incl.)", v or 0.0, float("nan")))
    finally:
        kit.stop()
    best = max((k for lbl, k, _ in rows if lbl.startswith("fixed")), default=0.0) or 1.0
    return [[f"{link} ({variant})", lbl, f"{k:.1f}", "n/a" if r != r else f"{r:.1f}",
             f"{k / best:.2f}"] for lbl, k, r in rows]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", default=LINKS)
    ap.add_argument("--chunks", default="512,1024,2400", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--windows", default="1,2,3", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--size", type=int, default=64 * 1024)
    ap.add_argument("--smpmgr", default=default_smpmgr())
    ap.add_argument("--note", default="")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="link-sweep-") as tmp:
        for link in args.links.split(","):
            if link == "renode":
                renode(args)
            else:
                rows += await sweep(link, Path(tmp), args)
    text = table(rows, ["link (build)", "upload", "kB/s", "% re-sent", "x best fixed"])
    text = (f"{args.size}-byte images, {time.strftime('%Y-%m-%d')}. {args.note}\n\n{text}")
    print(text)
    if args.write:
        update_doc("link-sweep", text)


if __name__ == "__main__":
    asyncio.run(main())
