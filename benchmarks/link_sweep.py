"""Upload sweep on the real Zephyr 3.4 smp_svr host builds: UDP, shell UART and BLE in one run.

The builds and their scripts are ``../shared/zephyr-native`` (``$SMPGW_SHARED``; driver:
``tests/zephyr_native.py``). For each link, against the same device process, one after the
other (images alternate 2.0.0 / 3.0.0, so no upload resumes another):

* **fixed**: every (chunk, window) pair of the grid, with no discovery (``fixed=True``);
* **tuned cold / warm**: the self-tuned upload with a fresh ``MemoryStore``, then again with
  what the first one learned (a gateway with its journal);
* **baseline**: ``smpmgr upload`` where it reaches the device (UDP, serial; ``--smpmgr PATH``,
  its CLI start-up included), on BLE the fixed pair (largest chunk, window 1) instead.

Columns: kB/s (image bytes / upload seconds), % re-sent (data bytes sent twice), and the ratio
to the best fixed pair of that link. The machine is shared: compare within one run.

    python benchmarks/link_sweep.py [--links udp,shell,ble] [--chunks 512,1024,2400]
                                    [--windows 1,2,3] [--size 65536] [--smpmgr PATH] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

VARIANT = {"udp": ("udp", "udp-params"), "shell": ("serial", "shell-params"), "ble": ("ble", "ble")}


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
    if kit.transport == "udp":
        args = ["--transport", "udp", "--port", kit.env["ZN_UDP_HOST"]]
    elif kit.transport == "serial":
        args = ["--port", kit.env["ZN_SERIAL_PTY"]]
    else:
        return None
    t0 = time.monotonic()
    r = subprocess.run([path, *args, "upgrade", "--no-reset", str(image)], capture_output=True,
                       timeout=600, check=False)
    return image.stat().st_size / (time.monotonic() - t0) / 1000 if r.returncode == 0 else None


async def sweep(link: str, work: Path, args: argparse.Namespace) -> list[list[str]]:
    imgs = make_images(work / "img", size=args.size)
    v3 = devkit.sign_image(work / "img" / "app-3.0.0.bin", version="3.0.0", key=imgs.key,
                           size=args.size + 2048, slot_size=0x69000)
    images = [imgs.v2.read_bytes(), Path(v3).read_bytes()]
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
            v = smpmgr(args.smpmgr, kit, imgs.v2)
            rows.append(("smpmgr upgrade --no-reset (CLI start-up incl.)", v or 0.0, 0.0))
    finally:
        kit.stop()
    best = max((k for lbl, k, _ in rows if lbl.startswith("fixed")), default=0.0) or 1.0
    return [[f"{link} ({variant})", lbl, f"{k:.1f}", f"{r:.0f}", f"{k / best:.2f}"]
            for lbl, k, r in rows]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--links", default="udp,shell,ble")
    ap.add_argument("--chunks", default="512,1024,2400", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--windows", default="1,2,3", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--size", type=int, default=64 * 1024)
    ap.add_argument("--smpmgr", default=os.environ.get("SMPMGR"))
    ap.add_argument("--note", default="")
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args()
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="link-sweep-") as tmp:
        for link in args.links.split(","):
            rows += await sweep(link, Path(tmp), args)
    text = table(rows, ["link (build)", "upload", "kB/s", "% re-sent", "x best fixed"])
    text = (f"{args.size}-byte images, {time.strftime('%Y-%m-%d')}. {args.note}\n\n{text}")
    print(text)
    if args.write:
        update_doc("link-sweep", text)


if __name__ == "__main__":
    asyncio.run(main())
