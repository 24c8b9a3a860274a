"""Upload time on real firmware: the gateway's upload vs ``smpmgr image upload``, same board,
same run, alternating, slot1 erased before and hash-checked after every upload.

    python renode/measure_upload.py [--reps 3] [--image PATH] [--workdir DIR]

The board is ``../shared/firmware/stm32f4_disco`` on Renode (``gateway/renode.py``); the image
is its ``smp_svr-2.0.0.signed.bin`` (48 KB) unless ``--image`` says otherwise. The gateway side
is ``SMPSession.upload`` as the engine calls it (MCUmgr parameters and image state read first,
no window/chunk overrides); smpmgr runs as its CLI (the user-facing tool, Python start-up
included, reported separately as the time until its process exits). Prints a table and one
JSON line (for docs/compatibility.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gateway.mcuboot import parse_image
from gateway.renode import RenodeMachine, firmware_dir
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport


async def _slot1_hash(pty: Path) -> bytes | None:
    async with SMPSession(SerialTransport(str(pty)), timeout_s=10) as s:
        for st in await s.image_state():
            if st.slot == 1:
                return bytes(st.hash) if st.hash else None
    return None


async def _erase(pty: Path) -> None:
    if await _slot1_hash(pty) is None:
        return  # img_mgmt answers an erase of an empty slot with an error (rc 1)
    async with SMPSession(SerialTransport(str(pty)), timeout_s=30) as s:
        await s.image_erase(1)
    if await _slot1_hash(pty) is not None:
        raise SystemExit("slot1 still holds an image after the erase")


async def gateway_upload(pty: Path, data: bytes) -> tuple[float, str]:
    async with SMPSession(SerialTransport(str(pty)), device_id="renode", timeout_s=10) as s:
        await s.mcumgr_params()
        await s.image_state()
        t0 = time.perf_counter()
        st = await s.upload(data, first_timeout_s=60)
        secs = time.perf_counter() - t0
    return secs, (f"window={st.window} chunk={st.chunk_size} retransmits={st.retransmits} "
                  f"rewinds={st.rewinds}")


async def smpmgr_upload(pty: Path, image: Path) -> tuple[float, str]:
    exe = shutil.which("smpmgr") or str(Path(sys.executable).with_name("smpmgr"))
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        exe, "--port", str(pty), "--timeout", "10", "image", "upload", str(image),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"smpmgr failed ({proc.returncode}): {out.decode(errors='replace')[-2000:]}")
    return secs, "smpmgr 'image upload' (smpclient, stop-and-wait)"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    fw = firmware_dir("stm32f4_disco")
    image = args.image or fw / "smp_svr-2.0.0.signed.bin"
    data = image.read_bytes()
    want = parse_image(data).hash
    work = args.workdir or Path(tempfile.mkdtemp(prefix="smpgw-measure-"))
    rows: dict[str, list[float]] = {"gateway": [], "smpmgr": []}
    notes: dict[str, str] = {}
    async with RenodeMachine(fw, work / "machine") as m:
        for rep in range(args.reps):
            for who in ("gateway", "smpmgr") if rep % 2 == 0 else ("smpmgr", "gateway"):
                await _erase(m.pty)
                if who == "gateway":
                    secs, note = await gateway_upload(m.pty, data)
                else:
                    secs, note = await smpmgr_upload(m.pty, image)
                got = await _slot1_hash(m.pty)
                if got != want:
                    raise SystemExit(f"{who}: slot1 holds {got.hex() if got else None} after the "
                                     f"upload, expected {want.hex()}")
                rows[who].append(secs)
                notes[who] = note
                print(f"rep {rep + 1} {who:8} {secs:6.1f} s  {len(data) / secs / 1000:5.2f} kB/s  {note}",
                      flush=True)
    print()
    result = {"image_bytes": len(data), "reps": args.reps}
    for who, secs in rows.items():
        med = statistics.median(secs)
        result[who] = {"median_s": round(med, 1), "min_s": round(min(secs), 1),
                       "max_s": round(max(secs), 1), "kB_per_s": round(len(data) / med / 1000, 2),
                       "note": notes[who]}
        print(f"{who:8} median {med:6.1f} s ({min(secs):.1f}-{max(secs):.1f})  "
              f"{len(data) / med / 1000:5.2f} kB/s")
    ratio = statistics.median(rows["smpmgr"]) / statistics.median(rows["gateway"])
    result["gateway_speedup_vs_smpmgr"] = round(ratio, 2)
    print(f"gateway vs smpmgr: {ratio:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
