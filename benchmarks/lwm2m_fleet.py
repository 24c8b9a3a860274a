"""LwM2M at scale: one gateway process, N endpoints registered at one Eclipse Wakaama server,
every device updated by PUSH (Block1); and PUSH / PULL throughput of one endpoint.

Fleet run (``--sizes 200``): a simulator process with N UDP devices on v1, the real Wakaama
``lwm2mserver`` (``$SMPGW_SHARED/lwm2m``, driven from here through ``tests/lwm2m_server.py``),
one ``smp-gateway run`` child process with ``source: lwm2m`` (one endpoint, one UDP socket per
device). The server observes State and Update Result of every endpoint, pushes v2 to all of
them at once (``write C /5/0/0 @v2``), executes Update on each once it reports State 2 and
waits for Update Result 1 everywhere. Measured: time to register all, to have all packages
Downloaded (pushed + every pre-flight check), to have all updated (upload, test boot, health
check, confirm); the gateway child's CPU seconds and peak RSS (``os.wait4`` rusage, after a
SIGTERM once all are done: deregistration included).

Throughput (``--throughput``): one endpoint, a ~256 KiB image; PUSH with Block1 sizes 256, 512
and 1024 (``-S``; 1024 is the largest Wakaama accepts - and CoAP over UDP has: SZX 6), time
from the write to its final 2.04 (the transfer) and to State 2; PULL over http and over coap
(Block2 1024, the gateway's size), time from the Package URI write to State 2.

    SMPGW_SHARED=/path/to/shared python benchmarks/lwm2m_fleet.py [--sizes 20,200] [--throughput]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import ROOT, make_image, raise_nofile, simulator, table, update_doc

sys.path.insert(0, str(ROOT / "tests"))

import aiocoap
import aiocoap.resource as coap_resource
from aiohttp import web
from fleet_servers.common import FileStore, serve
from lwm2m_server import Ev, Wakaama, free_udp_port, tlv_int

from gateway import devkit

IMAGE_SIZE = 32 * 1024
SLOT = 0x10000
BIG_IMAGE = 256 * 1024
BIG_SLOT = 0x60000
RTT_S = 0.010
STATE, RESULT = "/5/0/3", "/5/0/5"


def gateway_config(root: Path, key: Path, eps: dict[str, Any], server: str, slot: int) -> Path:
    gw = {
        "gateway_id": "bench", "state_dir": str(root / "gw-state"), "trusted_keys": [str(key)],
        "max_concurrent": max(len(eps), 1),
        "source": {"kind": "lwm2m", "server": server, "bind_host": "127.0.0.1",
                   "lifetime_s": 600, "poll_interval_s": 120, "request_timeout_s": 30},
        "devices": [{"id": d, "hardware": "sim_board", "slot_size": slot, "health_check_s": 1.0,
                     "transport": {"kind": "udp", "host": ep["host"], "port": ep["port"]},
                     "timeouts": {"reset_s": 60, "request_s": 5.0}}
                    for d, ep in sorted(eps.items())],
    }
    path = root / "gateway.yaml"
    path.write_text(yaml.safe_dump(gw, sort_keys=False))
    return path


class GatewayChild:
    """``smp-gateway run`` as a child process (Popen: its rusage is ours to collect)."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.log = open(log, "w")  # closed in stop()
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config",
                                      str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)

    def stop(self) -> dict[str, float]:
        self.proc.send_signal(signal.SIGTERM)
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.log.close()
        return {"cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024,
                "exit": os.waitstatus_to_exitcode(status)}


def downloaded(c: int) -> Any:
    def ok(e: Ev) -> bool:
        return e.kind == "NOTIFY" and e.client == c and e.get("uri") == STATE \
            and e.payload != b"" and tlv_int(e.payload) == 2
    return ok


async def fleet_one(n: int, work: Path, key: Path, v1: Path, v2: Path) -> dict[str, Any]:
    root = work / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    devices = [{"id": f"dev{i:04d}", "udp": {"host": "127.0.0.1", "port": 0}, "key": str(key),
                "initial_image": str(v1), "slot_size": SLOT, "boot_time_s": 0.3,
                "link": {"latency_s": RTT_S / 2}} for i in range(n)]
    with simulator(root, devices, timeout_s=600) as eps:
        async with Wakaama() as srv:
            gw = GatewayChild(gateway_config(root, key, eps, srv.url, SLOT), root / "gateway.log")
            try:
                ids = sorted(eps)
                clients = {d: await srv.registered(d, within=300) for d in ids}
                t_reg = time.perf_counter() - gw.t0
                for d in ids:
                    await srv.observe(clients[d], STATE, within=60)
                    await srv.observe(clients[d], RESULT, within=60)
                m = srv.mark()
                t1 = time.perf_counter()
                for d in ids:
                    await srv.cmd(f"write {clients[d]} /5/0/0 @{v2}")
                for d in ids:
                    await srv.wait(downloaded(clients[d]), 900, m)
                t_push = time.perf_counter() - t1
                t2 = time.perf_counter()
                for d in ids:
                    await srv.cmd(f"exec {clients[d]} /5/0/2")
                for d in ids:
                    await srv.notified(clients[d], RESULT, 1, 900, m)
                t_upd = time.perf_counter() - t2
                wall = time.perf_counter() - gw.t0
            finally:
                ru = gw.stop()
    return {"n": n, "register_s": t_reg, "push_s": t_push, "update_s": t_upd, "wall_s": wall,
            **ru}


async def throughput(work: Path, key: Path) -> list[list[str]]:
    root = work / "throughput"
    root.mkdir(parents=True, exist_ok=True)
    v1 = root / "app-1.0.0.bin"
    make_image(v1, 16 * 1024, version="1.0.0", key=key, slot_size=BIG_SLOT)
    rows = []
    runs: list[tuple[str, int]] = [("push", 256), ("push", 512), ("push", 1024),
                                   ("pull-http", 1024), ("pull-coap", 1024)]
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    site = coap_resource.Site()
    coap_port = free_udp_port()
    images: dict[str, bytes] = {}

    class Fw(coap_resource.Resource):
        async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(payload=images["cur"])

    site.add_resource(["fw", "app.bin"], Fw())
    ctx = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", coap_port),
                                                      transports=["udp6"])
    try:
        async with serve(app) as base:
            for i, (kind, block) in enumerate(runs):
                v2 = root / f"app-2.0.{i + 1}.bin"
                data = make_image(v2, BIG_IMAGE, version=f"2.0.{i + 1}", key=key,
                                  slot_size=BIG_SLOT)
                images["cur"] = data
                run_root = root / f"{kind}-{block}"
                shutil.rmtree(run_root, ignore_errors=True)
                devices = [{"id": "dev0", "udp": {"host": "127.0.0.1", "port": 0},
                            "key": str(key), "initial_image": str(v1), "slot_size": BIG_SLOT}]
                with simulator(run_root, devices) as eps:
                    async with Wakaama(block_size=block) as srv:
                        gw = GatewayChild(gateway_config(run_root, key, eps, srv.url, BIG_SLOT),
                                          run_root / "gateway.log")
                        try:
                            c = await srv.registered("dev0", within=60)
                            await srv.observe(c, STATE)
                            m = srv.mark()
                            t0 = time.perf_counter()
                            transfer = float("nan")
                            if kind == "push":
                                r = await srv.write(c, "/5/0/0", f"@{v2}", within=600)
                                assert r.code == "2.04", r
                                transfer = time.perf_counter() - t0
                            elif kind == "pull-http":
                                url = base + fs.add(v2.name, data)
                                assert (await srv.write(c, "/5/0/1", url)).code == "2.04"
                            else:
                                uri = f"coap://127.0.0.1:{coap_port}/fw/app.bin"
                                assert (await srv.write(c, "/5/0/1", uri)).code == "2.04"
                            await srv.wait(downloaded(c), 600, m)
                            to_state2 = time.perf_counter() - t0
                        finally:
                            ru = gw.stop()
                size = len(data)
                t = transfer if kind == "push" else to_state2
                rows.append([kind, str(block), str(size),
                             f"{transfer:.2f}" if kind == "push" else "-", f"{to_state2:.2f}",
                             f"{size / t / 1024:.0f}", f"{ru['cpu_s']:.1f}"])
                print(" | ".join(rows[-1]), flush=True)
    finally:
        await ctx.shutdown()
    return rows


async def amain(args: argparse.Namespace) -> int:
    raise_nofile(16384)
    work = Path(tempfile.mkdtemp(prefix="smp-bench-lwm2m-"))
    key = devkit.make_key(work / "key.pem")
    v1, v2 = work / "app-1.0.0.bin", work / "app-2.0.0.bin"
    make_image(v1, IMAGE_SIZE, version="1.0.0", key=key, slot_size=SLOT)
    make_image(v2, IMAGE_SIZE + 1024, version="2.0.0", key=key, slot_size=SLOT)
    load = os.getloadavg()[0]
    stamp = (f"{os.cpu_count()} CPUs shared with other work (load average {load:.1f} at the "
             f"start); {time.strftime('%Y-%m-%d %H:%M')}.")
    if args.sizes:
        results = []
        for n in [int(x) for x in args.sizes.split(",")]:
            r = await fleet_one(n, work, key, v1, v2)
            results.append(r)
            print(f"N={n}: register {r['register_s']:.1f}s push->State 2 {r['push_s']:.1f}s "
                  f"update->Result 1 {r['update_s']:.1f}s total {r['wall_s']:.1f}s; gateway "
                  f"CPU {r['cpu_s']:.1f}s peak RSS {r['maxrss_mb']:.0f} MB exit {r['exit']}",
                  flush=True)
        md = table([[str(r["n"]), f"{r['register_s']:.1f}", f"{r['push_s']:.1f}",
                     f"{r['update_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                     f"{r['cpu_s'] / r['n'] * 1000:.0f}", f"{r['maxrss_mb']:.0f}",
                     f"{r['n']}/{r['n']}"] for r in results],
                   ["N endpoints", "all registered s", "all pushed + checked (State 2) s",
                    "all updated (Result 1) s", "total s", "gateway CPU s", "CPU ms / endpoint",
                    "gateway peak RSS MB", "Result 1"])
        print(md)
        if not args.no_doc:
            update_doc("lwm2m-fleet", md + f"\n\nImage {v2.stat().st_size} bytes, slot "
                       f"{SLOT // 1024} KiB, Block1 1024, RTT {RTT_S * 1000:.0f} ms per device, "
                       f"boot 0.3 s, health check 1 s; {stamp}")
    if args.throughput:
        rows = await throughput(work, key)
        md = table(rows, ["delivery", "block bytes", "package bytes", "transfer s (write to 2.04)",
                          "write to State 2 s", "KiB/s (PUSH: transfer, PULL: to State 2)",
                          "gateway CPU s (whole run)"])
        print(md)
        if not args.no_doc:
            update_doc("lwm2m-throughput", md + f"\n\n{stamp}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200", help="endpoint counts, e.g. 20,200 ('' = none)")
    ap.add_argument("--throughput", action="store_true", help="PUSH / PULL throughput too")
    ap.add_argument("--no-doc", action="store_true", help="print only, docs/benchmarks.md untouched")
    ap.add_argument("--keep", action="store_true")
    return asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
