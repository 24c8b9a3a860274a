"""Upload throughput: the gateway's windowed upload vs smpclient's ``SMPClient.upload``.

One simulator process (``python -m gateway.sim``) hosts one device per link scenario; both
clients upload the same 256 KiB image to the same device, one after the other, in this
process (slot 1 is erased before every run, every run ends with a hash check). Prints a table
of throughput, the ratio between the clients and the efficiency against the link's bound;
writes docs/throughput_vs_rtt.png, docs/throughput.json and the table into docs/benchmarks.md.

    python benchmarks/throughput.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import DOCS, make_image, simulator, table, update_doc

from gateway.mcuboot import parse_image
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport, Transport, UdpTransport
from gateway.smp.upload import chunk_data_room

IMAGE_SIZE = 256 * 1024
BUF_SIZE = 2475  # smp_svr's Bluetooth overlay value; UDP packets are capped by the MTU anyway
BAUD = 115200


@dataclass
class Scenario:
    name: str
    kind: str  # udp / serial
    rtt_ms: float = 0.0
    buf_count: int = 4
    loss: float = 0.0  # per direction
    bandwidth: float | None = None  # bytes/s per direction (UDP)
    group: str = "rtt"

    def device(self, v1: Path) -> dict[str, Any]:
        link: dict[str, Any] = {"latency_s": self.rtt_ms / 2000, "seed": 1}
        if self.loss:
            link.update(request_loss=self.loss, response_loss=self.loss)
        if self.bandwidth:
            link["bandwidth_bps"] = self.bandwidth
        d: dict[str, Any] = {"id": self.dev_id, "slot_size": 0x60000, "initial_image": str(v1),
                             "buf_size": BUF_SIZE, "buf_count": self.buf_count, "link": link,
                             "boot_time_s": 0.1}
        if self.kind == "udp":
            d["udp"] = {"host": "127.0.0.1", "port": 0}
        else:
            d["serial"] = {"baud": BAUD}
        return d

    @property
    def dev_id(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name).strip("-")


SCENARIOS = [
    Scenario("UDP RTT 0 ms", "udp", 0),
    Scenario("UDP RTT 5 ms", "udp", 5),
    Scenario("UDP RTT 20 ms", "udp", 20),
    Scenario("UDP RTT 50 ms", "udp", 50),
    Scenario("UDP RTT 20 ms, buf_count 2", "udp", 20, buf_count=2, group="buf"),
    Scenario("UDP RTT 20 ms, buf_count 8", "udp", 20, buf_count=8, group="buf"),
    Scenario("UDP 1 Mbit/s, RTT 5 ms", "udp", 5, bandwidth=125_000, group="bw"),
    Scenario("UDP RTT 20 ms, 1 % loss", "udp", 20, loss=0.01, group="loss"),
    Scenario("UDP RTT 20 ms, 5 % loss", "udp", 20, loss=0.05, group="loss"),
    Scenario("serial 115200 baud (PTY)", "serial", 0, group="serial"),
]


@dataclass
class Run:
    client: str
    seconds: float
    cpu_s: float
    ok: bool
    retries: int = 0
    note: str = ""

    def kbps(self, size: int) -> float:
        return size / self.seconds / 1000 if self.ok else 0.0


def transport_for(sc: Scenario, ep: dict[str, Any]) -> Transport:
    if sc.kind == "udp":
        return UdpTransport(ep["host"], ep["port"])
    return SerialTransport(ep["address"], BAUD)


async def erase_and_check(sc: Scenario, ep: dict[str, Any], image: bytes | None) -> bool:
    """Erase slot 1 (image=None) or check that it holds ``image``."""
    async with SMPSession(transport_for(sc, ep), device_id=sc.dev_id, timeout_s=3.0) as s:
        if image is None:
            await s.image_erase(1)
            return True
        states = await s.image_state()
        want = parse_image(image).hash
        return any(st.slot == 1 and st.hash == want for st in states)


async def run_gateway(sc: Scenario, ep: dict[str, Any], image: bytes) -> Run:
    async with SMPSession(transport_for(sc, ep), device_id=sc.dev_id, timeout_s=2.0) as s:
        await s.mcumgr_params()
        await s.image_state()  # as the engine does before an upload (seeds the RTT estimate)
        t0, c0 = time.perf_counter(), time.process_time()
        st = await s.upload(image)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    ok = await erase_and_check(sc, ep, image)
    return Run("gateway", secs, cpu, ok, st.retransmits + st.rewinds,
               f"W={st.window} chunk={st.chunk_size} rto={st.rto_s * 1000:.0f}ms")


async def run_smpclient(sc: Scenario, ep: dict[str, Any], image: bytes) -> Run:
    from smpclient import SMPClient
    from smpclient.transport.serial import SMPSerialTransport
    from smpclient.transport.udp import SMPUDPTransport

    if sc.kind == "udp":
        tr: Any = SMPUDPTransport()
        orig = tr.connect
        port = ep["port"]

        async def connect(address: str, timeout_s: float, port_: int = port) -> None:
            await orig(address, timeout_s, port_)

        tr.connect = connect
        client = SMPClient(tr, ep["host"], timeout_s=2.5)
        sub_timeout = 1.0
    else:
        client = SMPClient(SMPSerialTransport(baudrate=BAUD), ep["address"], timeout_s=2.5)
        sub_timeout = 2.5
    await client.connect()
    retries = 0
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        while True:
            try:
                off = 0
                async for off_ in client.upload(image, first_timeout_s=sub_timeout,
                                                subsequent_timeout_s=sub_timeout):
                    off = off_
                if off == len(image):
                    break
            except Exception:  # a lost datagram: smpclient raises; start again (sha resume)
                retries += 1
                if retries > 200:
                    raise
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        await client.disconnect()
    ok = await erase_and_check(sc, ep, image)
    return Run("smpclient", secs, cpu, ok, retries, "stop-and-wait, re-started after a timeout")


def bound(sc: Scenario, window: int, ep_kind: str) -> tuple[float | None, str]:
    """Upper bound of image bytes/s for a client with ``window`` chunks in flight."""
    if sc.kind == "serial":
        limit = BUF_SIZE - 4
        n = chunk_data_room(limit, 100_000)
        from smp import packet as smppacket

        framed = sum(len(x) for x in smppacket.encode(b"\0" * limit, 127))
        return BAUD / 10 * n / framed, "UART payload capacity"
    n = chunk_data_room(1472, 100_000)
    bounds = []
    if sc.bandwidth:
        bounds.append((sc.bandwidth * n / 1472, "link payload capacity"))
    if sc.rtt_ms:
        bounds.append((window * n / (sc.rtt_ms / 1000), f"window bound {window}x chunk/RTT"))
    if not bounds:
        return None, "CPU-bound (no link limit)"
    return min(bounds)


async def main_async(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="smp-bench-tput-"))
    v1 = work / "app-1.0.0.bin"
    make_image(v1, 16 * 1024, version="1.0.0")
    image = make_image(work / "app-2.0.0.bin", IMAGE_SIZE)
    size = len(image)
    scenarios = SCENARIOS if not args.quick else [s for s in SCENARIOS if s.group in ("rtt",)]
    if args.only:
        scenarios = [s for s in scenarios if args.only.lower() in s.name.lower()]
    results: list[dict[str, Any]] = []
    with simulator(work, [sc.device(v1) for sc in scenarios]) as eps:
        for sc in scenarios:
            ep = eps[sc.dev_id]
            runs: dict[str, list[Run]] = {"smpclient": [], "gateway": []}
            for _ in range(args.reps):
                for name, fn in (("smpclient", run_smpclient), ("gateway", run_gateway)):
                    await erase_and_check(sc, ep, None)
                    r = await fn(sc, ep, image)
                    runs[name].append(r)
                    print(f"  {sc.name:<30} {name:<9} {r.seconds:7.2f}s {r.kbps(size):7.1f} kB/s "
                          f"cpu {r.cpu_s:5.2f}s ok={r.ok} retries={r.retries} {r.note}",
                          flush=True)
            med = {k: statistics.median(x.seconds for x in v) for k, v in runs.items()}
            w = max(1, sc.buf_count - 1)
            b_gw, b_what = bound(sc, w, sc.kind)
            b_sc, _ = bound(sc, 1, sc.kind)
            results.append({
                "scenario": asdict(sc), "name": sc.name, "image_bytes": size,
                "smpclient_s": med["smpclient"], "gateway_s": med["gateway"],
                "smpclient_kBps": size / med["smpclient"] / 1000,
                "gateway_kBps": size / med["gateway"] / 1000,
                "ratio": med["smpclient"] / med["gateway"],
                "bound_kBps": b_gw / 1000 if b_gw else None, "bound": b_what,
                "smpclient_bound_kBps": b_sc / 1000 if b_sc else None,
                "ok": all(r.ok for v in runs.values() for r in v),
                "gateway_cpu_s": statistics.median(x.cpu_s for x in runs["gateway"]),
                "smpclient_cpu_s": statistics.median(x.cpu_s for x in runs["smpclient"]),
                "gateway_note": runs["gateway"][-1].note,
                "retries": {k: [x.retries for x in v] for k, v in runs.items()},
            })
    rows = []
    for res in results:
        eff = (f"{res['gateway_kBps'] / res['bound_kBps'] * 100:.0f} % of {res['bound_kBps']:.1f} "
               f"({res['bound']})" if res["bound_kBps"] else res["bound"])
        mb = size / 1e6
        rows.append([res["name"], f"{res['smpclient_kBps']:.1f}", f"{res['gateway_kBps']:.1f}",
                     f"{res['ratio']:.2f}x", eff,
                     f"{res['smpclient_cpu_s'] / mb:.2f} / {res['gateway_cpu_s'] / mb:.2f}",
                     "yes" if res["ok"] else "NO"])
    header = ["link (one device)", "smpclient kB/s", "gateway kB/s", "gateway / smpclient",
              "gateway efficiency (bound kB/s)", "client CPU s/MB (smpclient / gateway)",
              "hash ok"]
    md = table(rows, header)
    print()
    print(md)
    meta = (f"\n\nImage {size} bytes (imgtool, 256 KiB payload class), device buf_size {BUF_SIZE}, "
            f"UDP MTU 1500 (1472-byte SMP packets: {chunk_data_room(1472, 100_000)} data bytes per "
            f"chunk), serial buf_size-4 = {BUF_SIZE - 4}-byte packets in 127-byte lines; "
            f"median of {args.reps} run(s) per client; {time.strftime('%Y-%m-%d %H:%M')}.")
    if not args.only and not args.quick:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "throughput.json").write_text(json.dumps(results, indent=2))
        update_doc("throughput", md + meta)
        plot(results)
    return 0 if all(r["ok"] for r in results) else 1


def plot(results: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    rtt = [r for r in results if r["scenario"]["group"] == "rtt"]
    xs = [r["scenario"]["rtt_ms"] for r in rtt]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(xs, [r["smpclient_kBps"] for r in rtt], "o-", label="smpclient SMPClient.upload (W=1)")
    ax[0].plot(xs, [r["gateway_kBps"] for r in rtt], "s-", label="gateway windowed upload (W=3)")
    bx = [x for x in xs if x > 0]
    n = chunk_data_room(1472, 100_000)
    ax[0].plot(bx, [3 * n / (x / 1000) / 1000 for x in bx], "k:", label="bound 3 x chunk / RTT")
    ax[0].plot(bx, [n / (x / 1000) / 1000 for x in bx], color="grey", ls=":",
               label="bound 1 x chunk / RTT")
    ax[0].set_xlabel("round-trip time (ms)")
    ax[0].set_ylabel("image throughput (kB/s)")
    ax[0].set_yscale("log")
    ax[0].set_title("UDP, buf_count 4, 256 KiB image")
    ax[0].legend(fontsize=8)
    ax[0].grid(True, which="both", alpha=0.3)
    buf = sorted([r for r in results if r["scenario"]["rtt_ms"] == 20 and not r["scenario"]["loss"]
                  and r["scenario"]["kind"] == "udp" and not r["scenario"]["bandwidth"]],
                 key=lambda r: r["scenario"]["buf_count"])
    bc = [r["scenario"]["buf_count"] for r in buf]
    ax[1].plot(bc, [r["gateway_kBps"] for r in buf], "s-", label="gateway (W = buf_count - 1)")
    ax[1].plot(bc, [r["smpclient_kBps"] for r in buf], "o-", label="smpclient (W = 1)")
    ax[1].plot(bc, [(b - 1) * n / 0.02 / 1000 for b in bc], "k:", label="bound (buf_count-1) x chunk / RTT")
    ax[1].set_xlabel("device buf_count")
    ax[1].set_ylabel("image throughput (kB/s)")
    ax[1].set_title("UDP, RTT 20 ms: the bound moves with buf_count")
    ax[1].legend(fontsize=8)
    ax[1].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "throughput_vs_rtt.png", dpi=110)
    print(f"wrote {DOCS / 'throughput_vs_rtt.png'}")


def main() -> int:
    logging.getLogger("smpclient").setLevel(logging.CRITICAL + 1)  # it logs whole packets
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="RTT scenarios only, no files written")
    ap.add_argument("--only", help="scenarios whose name contains this (no files written)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
