"""Upload throughput on real firmware: Zephyr smp_svr + MCUboot on Renode's STM32F4-Discovery.

SMP over the emulated UART (``uart_mcumgr.c``: 2 RX line buffers of 128 bytes, MCUmgr params
384 x 4) through a host PTY (``gateway/renode.py`` starts the machine: ``../shared/firmware/
stm32f4_disco``). In one run, against the same machine, one after the other:

* **smpmgr**: smpclient's ``SMPClient.upload`` with the serial settings ``smpmgr`` passes
  (``smpmgr/common.py``: ``line_length`` 128, ``line_buffers`` 2, encoded frame 256 -> 169-byte
  packets; stop-and-wait; ``--timeout`` 2 s). In-process, so only the upload is timed, as
  for the gateway (the real CLI adds its start-up; ``--cli`` times that too).
* **gateway (tuned)**: ``SMPSession.upload`` with one ``MemoryStore`` for the whole run: the
  first upload is *cold* (discovers packet size and window), the later ones are *warm*
  (start from what the first learned, like a gateway with its journal).
* **sweep**: the gateway with *fixed* packet size x window (no discovery), to find the
  device's own best setting.

Every upload goes to slot 1 after an erase and alternates the 2.0.0 / 3.0.0 images; the
device answers ``match`` for neither (no ``CONFIG_IMG_ENABLE_IMAGE_CHECK``), so each run ends
with an image-state read: slot 1 must hold the uploaded image's hash. Renode shares the
machine's 2 cores with everything else: figures vary between runs by tens of percent, so
compare within a run (the ratios), and use ``--reps``.

    python benchmarks/renode_upload.py [--reps 3] [--no-sweep] [--packets 176,266,356,380]
                                       [--windows 1,2,3] [--cli] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import DOCS, table, update_doc

from gateway.mcuboot import parse_image
from gateway.renode import RenodeMachine, firmware_dir
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport
from gateway.smp.tuning import MemoryStore, serial_lines
from gateway.smp.upload import WindowedUpload

RUN_TIMEOUT_S = 150.0


@dataclass
class Result:
    client: str
    image: str
    seconds: float | None  # None: failed
    size: int
    retx_ratio: float | None = None  # data bytes sent again / image bytes (gateway)
    packet: int | None = None
    window: str = ""
    note: str = ""
    ok: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kbps(self) -> float:
        return self.size / self.seconds / 1000 if self.seconds and self.ok else 0.0


async def erase(pty: Path) -> None:
    async with SMPSession(SerialTransport(str(pty)), device_id="bench", timeout_s=30.0) as s:
        try:
            await s.image_erase(None)
        except Exception:  # an empty slot answers an error on this build: nothing to erase
            pass


async def slot1_holds(pty: Path, image: bytes) -> bool:
    async with SMPSession(SerialTransport(str(pty)), device_id="bench", timeout_s=5.0) as s:
        states = await s.image_state()
    want = parse_image(image).hash
    return any(st.slot == 1 and st.hash == want for st in states)


async def run_smpmgr(pty: Path, image: bytes, name: str) -> Result:
    from smpclient import SMPClient
    from smpclient.transport.serial import SMPSerialTransport

    with warnings.catch_warnings():  # smpmgr passes the 7.1-style (deprecated) parameters
        warnings.simplefilter("ignore")
        tr = SMPSerialTransport(max_smp_encoded_frame_size=256, line_length=128, line_buffers=2)
    client = SMPClient(tr, str(pty), timeout_s=2.0)
    await client.connect()
    restarts = 0
    t0 = time.perf_counter()
    try:
        while True:
            try:
                async for _ in client.upload(image):
                    pass
                break
            except Exception:  # smpmgr would exit; the user runs it again (sha resume)
                restarts += 1
                if restarts > 20:
                    return Result("smpmgr", name, None, len(image), note="20 restarts")
        secs = time.perf_counter() - t0
    finally:
        await client.disconnect()
    ok = await slot1_holds(pty, image)
    return Result("smpmgr", name, secs, len(image), packet=tr.max_unencoded_size, window="1",
                  note=f"restarts={restarts}", ok=ok)


async def run_cli(pty: Path, path: Path, name: str, size: int) -> Result:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smpmgr", "--port", str(pty), "image", "upload", str(path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rc = await proc.wait()
    secs = time.perf_counter() - t0
    ok = rc == 0 and await slot1_holds(pty, path.read_bytes())
    return Result("smpmgr CLI (wall, incl. start-up)", name, secs, size, window="1", ok=ok,
                  note=f"exit {rc}")


async def run_gateway(pty: Path, image: bytes, name: str, *, store: MemoryStore | None,
                      packet: int | None = None, window: int | None = None,
                      label: str = "gateway") -> Result:
    fixed = packet is not None
    tr = SerialTransport(str(pty), mtu=packet)
    async with SMPSession(tr, device_id="renode-stm32f4", timeout_s=2.0) as s:
        await s.mcumgr_params()
        await s.image_state()  # as the engine does before an upload (seeds the RTT estimate)
        up = WindowedUpload(s, image, window=window, store=store, fixed=fixed,
                            max_stalls=40 if fixed else 8, first_timeout_s=10.0 if fixed else 30.0)
        t0 = time.perf_counter()
        try:
            st = await up.run()
        except Exception as exc:
            return Result(label, name, None, len(image), packet=packet,
                          window=str(window or ""), note=f"failed: {exc}"[:120])
        secs = time.perf_counter() - t0
    ok = await slot1_holds(pty, image)
    w = f"{st.window}" if st.window_max == st.window else f"{st.window}->{st.window_max}->{st.window_final}"
    return Result(label, name, secs, len(image), retx_ratio=st.retransmitted_ratio,
                  packet=st.packet, window=w, ok=ok,
                  note=f"retx={st.retransmits} rewinds={st.rewinds} spurious={st.spurious}"
                       + (f" probes={st.probes}" if st.probes else "")
                       + (f" [{'; '.join(st.fallbacks)}]" if st.fallbacks else ""),
                  extra={"plan": st.plan})


async def bounded(coro: Any, label: str, name: str, size: int) -> Result:
    try:
        return await asyncio.wait_for(coro, RUN_TIMEOUT_S)
    except TimeoutError:
        return Result(label, name, None, size, note=f"no result within {RUN_TIMEOUT_S:g}s")


def show(r: Result) -> None:
    kb = f"{r.kbps:6.2f} kB/s" if r.ok else "  FAILED   "
    retx = f"retx {r.retx_ratio * 100:4.1f}%" if r.retx_ratio is not None else ""
    print(f"  {r.client:<34} {r.image:<6} {kb} {retx:<11} packet={r.packet} W={r.window} "
          f"{r.note}", flush=True)


async def main_async(args: argparse.Namespace) -> int:
    fw = firmware_dir("stm32f4_disco")
    images = {v: (fw / f"smp_svr-{v}.signed.bin") for v in ("2.0.0", "3.0.0")}
    data = {v: p.read_bytes() for v, p in images.items()}
    work = Path(tempfile.mkdtemp(prefix="smpgw-renode-bench-"))
    machine = RenodeMachine(fw, work)
    print(f"Renode machine in {work} ...", flush=True)
    await machine.start()
    pty = machine.pty
    results: dict[str, list[Result]] = {"compare": [], "sweep": []}
    store = MemoryStore()
    n = 0
    try:
        for rep in range(args.reps):
            for i, client in enumerate(("smpmgr", "gateway")):
                v = "2.0.0" if (rep + i) % 2 == 0 else "3.0.0"  # each client gets both images
                n += 1
                await erase(pty)
                if client == "smpmgr":
                    r = await bounded(run_smpmgr(pty, data[v], v), "smpmgr", v, len(data[v]))
                else:
                    label = "gateway (tuned, cold)" if rep == 0 else "gateway (tuned, warm)"
                    r = await bounded(run_gateway(pty, data[v], v, store=store, label=label),
                                      label, v, len(data[v]))
                results["compare"].append(r)
                show(r)
            if args.cli and rep == 0:
                await erase(pty)
                r = await run_cli(pty, images["2.0.0"], "2.0.0", len(data["2.0.0"]))
                results["compare"].append(r)
                show(r)
        if not args.no_sweep:
            print("sweep (fixed packet x window, no discovery):", flush=True)
            for w in args.windows:
                for p in args.packets:
                    v = "2.0.0" if n % 2 == 0 else "3.0.0"
                    n += 1
                    await erase(pty)
                    label = f"fixed {p} B ({serial_lines(p, 127)} lines) x W{w}"
                    r = await bounded(run_gateway(pty, data[v], v, store=None, packet=p, window=w,
                                                  label=label), label, v, len(data[v]))
                    results["sweep"].append(r)
                    show(r)
    finally:
        await machine.stop()
    return report(results, store, args)


def report(results: dict[str, list[Result]], store: MemoryStore, args: argparse.Namespace) -> int:
    cmp = results["compare"]
    sm = [r for r in cmp if r.client == "smpmgr"]
    cold = [r for r in cmp if "cold" in r.client]
    warm = [r for r in cmp if "warm" in r.client]
    ratios = []
    for a, b in zip(sm, [r for r in cmp if r.client.startswith("gateway")], strict=False):
        if a.ok and b.ok:
            ratios.append(b.kbps / a.kbps)

    def med(rs: list[Result]) -> float:
        ok = [r.kbps for r in rs if r.ok]
        return statistics.median(ok) if ok else 0.0

    sweep_ok = [r for r in results["sweep"] if r.ok]
    best = max(sweep_ok, key=lambda r: r.kbps) if sweep_ok else None
    rows = [[r.client, r.image, f"{r.kbps:.2f}" if r.ok else "failed",
             f"{r.retx_ratio * 100:.1f} %" if r.retx_ratio is not None else "-",
             str(r.packet or "-"), r.window or "-", r.note.replace("|", "/")] for r in cmp]
    md = table(rows, ["client", "image", "kB/s", "retransmitted bytes", "packet B", "window",
                      "notes"])
    summary = [f"smpmgr median {med(sm):.2f} kB/s; gateway cold {med(cold):.2f}, "
               f"warm median {med(warm):.2f} kB/s; gateway / smpmgr in the same rep: "
               + ", ".join(f"{x:.2f}x" for x in ratios)]
    if best is not None:
        tuned = med(warm) or med(cold)
        summary.append(f"sweep best: {best.client} = {best.kbps:.2f} kB/s; tuned (warm median) is "
                       f"{tuned / best.kbps * 100:.0f} % of it")
    print()
    print(md)
    print("\n".join(summary))
    sweep_md = ""
    if results["sweep"]:
        srows = [[r.client, f"{r.kbps:.2f}" if r.ok else "failed",
                  f"{r.retx_ratio * 100:.1f} %" if r.retx_ratio is not None else "-",
                  r.note.replace("|", "/")[:90]] for r in results["sweep"]]
        sweep_md = table(srows, ["fixed setting", "kB/s", "retransmitted bytes", "notes"])
        print()
        print(sweep_md)
    learned = store.link_tuning("renode-stm32f4")
    print(f"\nlearned: {learned}")
    if args.write:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        text = (md + "\n\n" + "\n\n".join(summary) + "\n\n" + (sweep_md + "\n\n" if sweep_md else "")
                + f"Learned and remembered: `{json.dumps(learned, sort_keys=True)}`; "
                f"{args.reps} rep(s); {stamp}.")
        update_doc("renode", text)
        (DOCS / "renode_upload.json").write_text(json.dumps(
            {k: [asdict(r) | {"kbps": r.kbps} for r in v] for k, v in results.items()}, indent=2))
    return 0 if all(r.ok for r in cmp) else 1


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("smpclient").setLevel(logging.CRITICAL + 1)  # it logs whole packets
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--packets", type=lambda s: [int(x) for x in s.split(",")],
                    default=[176, 266, 356, 380])
    ap.add_argument("--windows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--cli", action="store_true", help="also time the real smpmgr CLI once")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md and the JSON")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
