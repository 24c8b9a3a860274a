"""Upload throughput: the gateway's tuned upload vs smpclient's ``SMPClient.upload``.

One simulator process (``python -m gateway.sim``) hosts one device per scenario; both clients
upload the same image to the same device, one after the other, in this process (slot 1 is
erased before every run, every run ends with a hash check).

Two groups of scenarios:

* **Link study** (RTT, buf_count, bandwidth, loss, 115200-baud serial): a device that answers
  at once (no flash time, MCUmgr parameters reported), so the figures show the protocol
  against the link; 256 KiB image.
* **Presets** (``gateway/sim/presets.py``: ``zephyr-uart``, ``zephyr-shell``, ``zephyr-udp``,
  ``renode-stm32f4-disco``): the simulator configured like each real transport of the stock
  sample, flash timings and receive paths included; 96 KiB image. The gateway runs twice with
  one ``MemoryStore`` (what the journal keeps): *cold* discovers packet size and window, *warm*
  starts from what cold learned.

Prints a table of throughput, the ratio between the clients and the efficiency against the
link's bound; writes docs/throughput_vs_rtt.png, docs/throughput.json and the tables into
docs/benchmarks.md.

    python benchmarks/throughput.py [--quick] [--reps N] [--only TEXT] [--presets-only]
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
from gateway.smp.session import SMPError, SMPSession
from gateway.smp.transport import SerialTransport, Transport, UdpTransport
from gateway.smp.tuning import MemoryStore
from gateway.smp.upload import chunk_data_room

IMAGE_SIZE = 256 * 1024
PRESET_IMAGE_SIZE = 96 * 1024
# the link study's device: answers at once (the presets model real flash and CPU)
IDEAL_DEVICE: dict[str, Any] = {"mcumgr_params_supported": True, "request_processing_s": 0.0,
                                "flash_write_bps": None, "flash_erase_sector_s": 0.0,
                                "flash_stalls_cpu": False}
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
    preset: str | None = None  # group "preset": gateway/sim/presets.py NAME
    overrides: dict[str, Any] | None = None  # preset fields changed (with the reason in name)

    def device(self, v1: Path) -> dict[str, Any]:
        if self.preset is not None:
            p: dict[str, Any] = {"id": self.dev_id, "preset": self.preset,
                                 "initial_image": str(v1), **(self.overrides or {})}
            if self.kind == "udp":
                p["udp"] = {"host": "127.0.0.1", "port": 0}  # not 1337: other sims may run
            return p
        link: dict[str, Any] = {"latency_s": self.rtt_ms / 2000, "seed": 1}
        if self.loss:
            link.update(request_loss=self.loss, response_loss=self.loss)
        if self.bandwidth:
            link["bandwidth_bps"] = self.bandwidth
        d: dict[str, Any] = {"id": self.dev_id, "slot_size": 0x60000, "initial_image": str(v1),
                             "buf_size": BUF_SIZE, "buf_count": self.buf_count, "link": link,
                             "boot_time_s": 0.1, **IDEAL_DEVICE}
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
    Scenario("preset zephyr-uart", "serial", group="preset", preset="zephyr-uart"),
    Scenario("preset zephyr-shell", "serial", group="preset", preset="zephyr-shell"),
    Scenario("preset zephyr-udp", "udp", group="preset", preset="zephyr-udp"),
    # the stock UDP sample has Kconfig's 2048 x 2 pool; a build that sets the generic 384 x 4
    Scenario("preset zephyr-udp, netbufs set to 384x4 in prj.conf", "udp", group="preset",
             preset="zephyr-udp", overrides={"buf_size": 384, "buf_count": 4}),
    Scenario("preset renode-stm32f4-disco", "serial", group="preset",
             preset="renode-stm32f4-disco"),
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
    # a real slot erase takes seconds (nRF52840: 118 pages x 85 ms)
    async with SMPSession(transport_for(sc, ep), device_id=sc.dev_id, timeout_s=30.0) as s:
        if image is None:
            try:
                await s.image_erase(1)
            except SMPError:  # img_mgmt refuses to erase an empty slot: nothing to do
                pass
            return True
        states = await s.image_state()
        want = parse_image(image).hash
        return any(st.slot == 1 and st.hash == want for st in states)


async def run_gateway(sc: Scenario, ep: dict[str, Any], image: bytes,
                      store: MemoryStore | None = None, client: str = "gateway") -> Run:
    async with SMPSession(transport_for(sc, ep), device_id=sc.dev_id, timeout_s=2.0) as s:
        await s.mcumgr_params()
        await s.image_state()  # as the engine does before an upload (seeds the RTT estimate)
        t0, c0 = time.perf_counter(), time.process_time()
        st = await s.upload(image, store=store)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    ok = await erase_and_check(sc, ep, image)
    w = f"{st.window}" if st.window_max == st.window else f"{st.window}->{st.window_final}"
    return Run(client, secs, cpu, ok, st.retransmits + st.rewinds,
               f"W={w} chunk={st.chunk_size} rto={st.rto_s * 1000:.0f}ms"
               + (f" retx {st.retransmitted_ratio * 100:.1f}%" if st.retransmitted_bytes else "")
               + (f" probes={st.probes}" if st.probes else ""))


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
    # presets: smpclient's own first-chunk timeout (40 s: the device erases first)
    first_timeout = 40.0 if sc.preset else sub_timeout
    max_retries = 5 if sc.preset else 200
    await client.connect()
    retries = 0
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        while True:
            try:
                off = 0
                async for off_ in client.upload(image, first_timeout_s=first_timeout,
                                                subsequent_timeout_s=sub_timeout):
                    off = off_
                if off == len(image):
                    break
            except Exception as exc:  # a lost datagram: smpclient raises; start again (sha resume)
                retries += 1
                if retries > max_retries:
                    if sc.preset:
                        return Run("smpclient", time.perf_counter() - t0, 0.0, False, retries,
                                   f"failed: {type(exc).__name__} {str(exc)[:60]}")
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
    small = make_image(work / "app-2.0.0-96k.bin", PRESET_IMAGE_SIZE)
    size = len(image)
    scenarios = SCENARIOS if not args.quick else [s for s in SCENARIOS if s.group in ("rtt",)]
    if args.presets_only:
        scenarios = [s for s in scenarios if s.group == "preset"]
    if args.only:
        scenarios = [s for s in scenarios if args.only.lower() in s.name.lower()]
    results: list[dict[str, Any]] = []
    presets: list[dict[str, Any]] = []
    with simulator(work, [sc.device(v1) for sc in scenarios]) as eps:
        for sc in scenarios:
            ep = eps[sc.dev_id]
            if sc.group == "preset":
                presets.append(await run_preset(sc, ep, small, args.reps, args.before_tree))
                continue
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
    stamp = time.strftime("%Y-%m-%d %H:%M")
    if results:
        rows = []
        for res in results:
            eff = (f"{res['gateway_kBps'] / res['bound_kBps'] * 100:.0f} % of "
                   f"{res['bound_kBps']:.1f} ({res['bound']})" if res["bound_kBps"] else res["bound"])
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
        meta = (f"\n\nImage {size} bytes (imgtool, 256 KiB payload class), device buf_size "
                f"{BUF_SIZE} (parameters reported, no flash time), UDP MTU 1500 (1472-byte SMP "
                f"packets: {chunk_data_room(1472, 100_000)} data bytes per chunk), serial "
                f"buf_size-4 = {BUF_SIZE - 4}-byte packets in 127-byte lines; median of "
                f"{args.reps} run(s) per client; {stamp}.")
        if not args.only and not args.quick and not args.presets_only:
            DOCS.mkdir(exist_ok=True)
            (DOCS / "throughput.json").write_text(json.dumps(results, indent=2))
            update_doc("throughput", md + meta)
            plot(results)
    if presets:
        md = preset_table(presets)
        print()
        print(md)
        meta = (f"\n\nImage {len(small)} bytes; smpclient: median of {args.reps} run(s) "
                f"(``SMPSerialTransport()`` / ``SMPUDPTransport()`` defaults, first-chunk timeout "
                f"40 s, re-started after a timeout); gateway: one cold run, then the median of "
                f"{args.reps} warm run(s) with what the cold one learned; {stamp}.")
        if not args.only and not args.quick:
            (DOCS / "throughput_presets.json").write_text(json.dumps(presets, indent=2))
            update_doc("presets", md + meta)
    ok = all(r["ok"] for r in results) and all(p["gateway_ok"] for p in presets)
    return 0 if ok else 1


BEFORE_SCRIPT = """
import asyncio, json, sys, time
from gateway.smp.session import SMPError, SMPSession
from gateway.smp.transport import SerialTransport, UdpTransport

async def main(kind, addr, port, path):
    image = open(path, "rb").read()
    tr = UdpTransport(addr, int(port)) if kind == "udp" else SerialTransport(addr, 115200)
    async with SMPSession(tr, device_id="before", timeout_s=2.0) as s:
        await s.mcumgr_params()
        await s.image_state()
        t0 = time.perf_counter()
        try:
            st = await s.upload(image)
        except Exception as exc:
            print(json.dumps({"error": str(exc)[:100], "seconds": time.perf_counter() - t0}))
            return
        print(json.dumps({"seconds": time.perf_counter() - t0, "window": st.window,
                          "chunk": st.chunk_size, "retx": st.retransmits}))

asyncio.run(main(*sys.argv[1:]))
"""


async def run_before(sc: Scenario, ep: dict[str, Any], image: bytes, tree: Path) -> Run:
    """The gateway of another checkout (the commit before the upload tuning) in a subprocess."""
    import os

    path = Path(tempfile.mkdtemp(prefix="smp-before-")) / "image.bin"
    path.write_bytes(image)
    addr = ep["host"] if sc.kind == "udp" else ep["address"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BEFORE_SCRIPT, sc.kind, addr, str(ep.get("port", 0)), str(path),
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    lines = out.decode().strip().splitlines()
    res: dict[str, Any] = json.loads(lines[-1]) if lines else {"error": "no output",
                                                                "seconds": 0.0}
    if "error" in res:
        return Run("before", res["seconds"], 0.0, False, 0, f"failed: {res['error']}")
    ok = await erase_and_check(sc, ep, image)
    return Run("before", res["seconds"], 0.0, ok, res["retx"],
               f"W={res['window']} chunk={res['chunk']}")


async def run_preset(sc: Scenario, ep: dict[str, Any], image: bytes, reps: int,
                     before_tree: Path | None = None) -> dict[str, Any]:
    """smpclient x reps, the gateway once cold and reps times warm (one MemoryStore), and the
    gateway before the tuning once (``--before-tree``)."""
    size = len(image)
    store = MemoryStore()
    runs: dict[str, list[Run]] = {"smpclient": [], "cold": [], "warm": []}
    order = ["smpclient", "cold"] + [x for _ in range(reps) for x in ("warm", "smpclient")]
    order = order[: 2 + 2 * reps - 1]  # smpclient reps times, warm reps times
    runs["before"] = []
    if before_tree is not None:
        order.append("before")
    for name in order:
        await erase_and_check(sc, ep, None)
        if name == "smpclient":
            r = await run_smpclient(sc, ep, image)
        elif name == "before":
            assert before_tree is not None
            r = await run_before(sc, ep, image, before_tree)
        else:
            r = await run_gateway(sc, ep, image, store=store, client=f"gateway {name}")
        runs[name].append(r)
        print(f"  {sc.name:<30} {r.client:<14} {r.seconds:7.2f}s {r.kbps(size):7.2f} kB/s "
              f"ok={r.ok} retries={r.retries} {r.note}", flush=True)

    def med(rs: list[Run]) -> float:
        ok = [r.kbps(size) for r in rs if r.ok]
        return statistics.median(ok) if ok else 0.0

    learned = store.link_tuning(sc.dev_id) or {}
    return {"name": sc.name, "scenario": asdict(sc), "image_bytes": size,
            "smpclient_kBps": med(runs["smpclient"]), "cold_kBps": med(runs["cold"]),
            "warm_kBps": med(runs["warm"]),
            "smpclient_ok": all(r.ok for r in runs["smpclient"]),
            "smpclient_note": runs["smpclient"][-1].note,
            "gateway_ok": all(r.ok for r in runs["cold"] + runs["warm"]),
            "cold_note": runs["cold"][-1].note, "warm_note": runs["warm"][-1].note,
            "before_kBps": med(runs["before"]) if runs["before"] else None,
            "before_note": runs["before"][-1].note if runs["before"] else "",
            "learned": {k: learned.get(k) for k in ("packet", "window", "packet_failed",
                                                     "window_failed")}}


def preset_table(presets: list[dict[str, Any]]) -> str:
    rows = []
    for p in presets:
        sc = f"{p['smpclient_kBps']:.2f}" if p["smpclient_ok"] else f"fails ({p['smpclient_note']})"
        ratio = (f"{p['warm_kBps'] / p['smpclient_kBps']:.2f}x" if p["smpclient_ok"]
                 and p["smpclient_kBps"] else "-")
        ln = p["learned"]
        learned = (f"packet {ln['packet']}, window {ln['window']}"
                   + (f" ({ln['packet_failed']} B lost)" if ln.get("packet_failed") else "")
                   + (f" (window {ln['window_failed']} lost)" if ln.get("window_failed") else ""))
        before = "-"
        if p.get("before_kBps") is not None:
            before = (f"{p['before_kBps']:.2f}" if p["before_kBps"] else "fails") + \
                f" ({p['before_note']})"
        rows.append([p["name"], sc, before, f"{p['cold_kBps']:.2f}", f"{p['warm_kBps']:.2f}",
                     ratio, learned, p["cold_note"], "yes" if p["gateway_ok"] else "NO"])
    return table(rows, ["simulated device", "smpclient kB/s", "gateway before tuning kB/s",
                        "gateway cold kB/s", "gateway warm kB/s", "warm / smpclient", "learned",
                        "cold run", "hash ok"])


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
    ap.add_argument("--presets-only", action="store_true",
                    help="only the preset scenarios (writes only their table)")
    ap.add_argument("--before-tree", type=Path,
                    help="presets: also run the gateway of this checkout once (a git worktree "
                         "of the commit before the upload tuning)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
