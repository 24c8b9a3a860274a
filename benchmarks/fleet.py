"""Fleet scale: one gateway process updates N simulated UDP devices (N = 1, 10, 100, 1000).

For each N: a simulator process (``python -m gateway.sim``) with N devices on v1, a local
update directory publishing v2, and one ``smp-gateway run --once`` child process with
``max_concurrent`` = N. Measured per N: wall time of the gateway process, its CPU seconds
(user + system) and peak RSS (``os.wait4`` rusage of that child), time per device, and the
outcome (every device must end on v2, confirmed: exit code 0).

Small images are used (32 KiB class, 64 KiB slots) so that N = 1000 fits the time budget on a
2-core machine; each device has a 10 ms RTT link. The full update flow runs for every device:
state read, upload (windowed), mark for test, reset, wait for the reboot, health check (1 s),
confirm.

    python benchmarks/fleet.py [--sizes 1,10,100,1000] [--profile N] [--discovery]

``--profile N`` runs the gateway under cProfile for that N and prints the top functions.
``--discovery``: no ``devices:`` list at all - each simulated device listens on port 1337 of its
own loopback address (127.1.0.0/22) and the gateway finds them from one ``device_templates:``
entry by probing that CIDR range (``discovery.udp``), identifies each over SMP (os info,
image list, MCUmgr parameters, bootloader info) and then updates them; the table goes to its
own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import DOCS, ROOT, make_image, raise_nofile, simulator, table, update_doc

from gateway import devkit

IMAGE_SIZE = 32 * 1024
SLOT = 0x10000
RTT_S = 0.010


def run_gateway(cfg_path: Path, log_path: Path, profile: Path | None) -> dict[str, Any]:
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "gateway.cli", "run", "--once", "--config", str(cfg_path)]
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime,
            "sys_s": ru.ru_stime, "maxrss_mb": ru.ru_maxrss / 1024,
            "exit": os.waitstatus_to_exitcode(status)}


DISCOVERY_NET = "127.1.0.0/22"  # 1022 loopback addresses: one per simulated device


def discovery_host(i: int) -> str:
    return f"127.1.{(i + 1) // 256}.{(i + 1) % 256}"


def one(n: int, work: Path, key: Path, v1: Path, v2: Path, profile: bool,
        discovery: bool = False, firmware_info: bool = False) -> dict[str, Any]:
    root = work / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    updates = root / "updates"
    updates.mkdir()
    shutil.copy(v2, updates / v2.name)
    (updates / "manifest.yaml").write_text(yaml.safe_dump(
        {"images": [{"file": v2.name, "hardware": "sim_board"}]}))
    devices = [{"id": f"dev{i:04d}", "udp": {"host": "127.0.0.1", "port": 0}, "key": str(key),
                "initial_image": str(v1), "slot_size": SLOT, "boot_time_s": 0.3,
                "link": {"latency_s": RTT_S / 2}} for i in range(n)]
    for i, d in enumerate(devices):
        if firmware_info:  # what discovery reads: os info, MCUmgr params, bootloader info
            d.update(os_info_supported=True, mcumgr_params_supported=True,
                     bootloader_info_supported=True)
        if discovery:  # one loopback address per device, SMP's port
            d["udp"] = {"host": discovery_host(i), "port": 1337}
    with simulator(root, devices, timeout_s=600) as eps:
        gw = {
            "gateway_id": "bench", "state_dir": str(root / "gw-state"),
            "trusted_keys": [str(key)], "max_concurrent": max(n, 1),
            "source": {"kind": "local", "path": str(updates), "poll_interval_s": 60},
            "devices": [{"id": d, "hardware": "sim_board", "slot_size": SLOT,
                         "health_check_s": 1.0,
                         "transport": {"kind": "udp", "host": ep["host"], "port": ep["port"]},
                         "timeouts": {"reset_s": 60, "request_s": 5.0}}
                        for d, ep in sorted(eps.items())],
        }
        if discovery:
            del gw["devices"]
            gw["discovery"] = {"udp": {"hosts": [DISCOVERY_NET], "port": 1337, "probe_rate": 5000,
                                       "probe_timeout_s": 2.0}, "concurrency": 256}
            gw["device_templates"] = [{
                "name": "bench", "match": {"transport": "udp", "board": "sim_board"},
                "id": "{node}", "slot_size": SLOT, "health_check_s": 1.0,
                "timeouts": {"reset_s": 60, "request_s": 5.0}}]
        cfg_path = root / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(gw, sort_keys=False))
        prof = root / "gateway.prof" if profile else None
        res = run_gateway(cfg_path, root / "gateway.log", prof)
    db = sqlite3.connect(root / "gw-state" / "journal.sqlite")
    outcomes = dict(db.execute("SELECT outcome, count(*) FROM devices GROUP BY outcome").fetchall())
    db.close()
    if discovery:
        fdb = sqlite3.connect(root / "gw-state" / "fleet.sqlite")
        res["discovered"] = fdb.execute("SELECT count(*) FROM discovered").fetchone()[0]
        fdb.close()
    res.update(n=n, updated=outcomes.get("updated", 0), outcomes=outcomes,
               per_device_ms=res["wall_s"] / n * 1000, cpu_per_device_ms=res["cpu_s"] / n * 1000)
    if prof is not None:
        st = pstats.Stats(str(prof))
        st.sort_stats("cumulative").print_stats(35)
        st.sort_stats("tottime").print_stats(30)
        res["profile"] = str(prof)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,10,100,1000")
    ap.add_argument("--profile", type=int, default=None, help="profile the gateway at this N only")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--discovery", action="store_true",
                    help="no devices: list; find every device from a template (UDP CIDR probe)")
    args = ap.parse_args()
    raise_nofile(16384)
    work = Path(tempfile.mkdtemp(prefix="smp-bench-fleet-"))
    key = devkit.make_key(work / "key.pem")
    v1 = work / "app-1.0.0.bin"
    v2 = work / "app-2.0.0.bin"
    make_image(v1, IMAGE_SIZE, version="1.0.0", key=key, slot_size=SLOT)
    make_image(v2, IMAGE_SIZE + 1024, version="2.0.0", key=key, slot_size=SLOT)
    sizes = [args.profile] if args.profile else [int(x) for x in args.sizes.split(",")]
    results = []
    if args.discovery and args.profile is None:
        return discovery_runs(sizes, work, key, v1, v2, keep=args.keep)
    for n in sizes:
        r = one(n, work, key, v1, v2, profile=args.profile is not None, discovery=args.discovery)
        results.append(r)
        print(f"N={n:<5} wall {r['wall_s']:7.1f}s  cpu {r['cpu_s']:6.1f}s  peak RSS "
              f"{r['maxrss_mb']:6.1f} MB  per device {r['per_device_ms']:7.1f} ms wall, "
              f"{r['cpu_per_device_ms']:6.1f} ms cpu  updated {r['updated']}/{n} exit {r['exit']}",
              flush=True)
    image_bytes = v2.stat().st_size
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    rows = [[str(r["n"]), f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['maxrss_mb']:.0f}",
             f"{r['per_device_ms']:.0f}", f"{r['cpu_per_device_ms']:.1f}",
             f"{r['updated']}/{r['n']}"] for r in results]
    md = table(rows, ["N devices", "wall s", "gateway CPU s", "gateway peak RSS MB",
                      "wall ms / device", "CPU ms / device", "updated + confirmed"])
    print()
    print(md)
    if args.profile is None and len(results) > 1:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "fleet.json").write_text(json.dumps(results, indent=2))
        meta = (f"\n\nImage {image_bytes} bytes, slot {SLOT // 1024} KiB, RTT "
                f"{RTT_S * 1000:.0f} ms per device, boot 0.3 s, health check 1 s; "
                f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}.")
        update_doc("fleet", md + meta)
        plot(results)
    return 0 if all(r["exit"] == 0 for r in results) else 1


def discovery_runs(sizes: list[int], work: Path, key: Path, v1: Path, v2: Path, keep: bool) -> int:
    """For each N: the same pass with a static ``devices:`` list and found by discovery."""
    rows = []
    ok = True
    for n in sizes:
        for mode in ("static devices:", "discovery"):
            r = one(n, work, key, v1, v2, profile=False, discovery=mode == "discovery",
                    firmware_info=True)
            ok = ok and r["exit"] == 0
            print(f"N={n:<5} {mode:<16} wall {r['wall_s']:7.1f}s  cpu {r['cpu_s']:6.1f}s  peak RSS "
                  f"{r['maxrss_mb']:6.1f} MB  updated {r['updated']}/{n}  "
                  f"discovered {r.get('discovered', '-')}  exit {r['exit']}", flush=True)
            rows.append([str(n), mode, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['maxrss_mb']:.0f}",
                         str(r.get("discovered", "-")), f"{r['updated']}/{n}"])
    image_bytes = v2.stat().st_size
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    md = table(rows, ["N devices", "devices from", "wall s", "gateway CPU s", "gateway peak RSS MB",
                      "discovered", "updated + confirmed"])
    print()
    print(md)
    meta = (f"\n\n`python benchmarks/fleet.py --discovery --sizes {','.join(map(str, sizes))}`: each "
            "N runs twice in the same session, once with the usual `devices:` list and once with no "
            f"list at all - one `device_templates:` entry and `discovery.udp.hosts: [{DISCOVERY_NET}]` "
            "(1022 loopback addresses probed with one SMP echo each from a single socket, silent ones "
            "probed twice, every answering device identified over SMP - image list, MCUmgr params, "
            "bootloader info, os info - then the same update). The simulated devices are the same in "
            "both rows and answer os info, MCUmgr parameters (384 x 4) and bootloader info, so these "
            "rows are not comparable with the table above (stock devices, no parameters). "
            "Wall time and peak RSS are those of "
            f"the `smp-gateway run --once` process. Image {image_bytes} bytes, RTT {RTT_S * 1000:.0f} "
            f"ms per device, boot 0.3 s, health check 1 s; {os.cpu_count()} CPUs; "
            f"{time.strftime('%Y-%m-%d %H:%M')}.")
    update_doc("fleet-discovery", md + meta)
    return 0 if ok else 1


def plot(results: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    ns = [r["n"] for r in results]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(ns, [r["wall_s"] for r in results], "o-", label="wall time (s)")
    ax[0].plot(ns, [r["cpu_s"] for r in results], "s-", label="gateway CPU (s)")
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("devices updated by one gateway process")
    ax[0].set_title("full update pass (32 KiB image, RTT 10 ms)")
    ax[0].legend()
    ax[0].grid(True, which="both", alpha=0.3)
    ax[1].plot(ns, [r["per_device_ms"] for r in results], "o-", label="wall ms per device")
    ax[1].plot(ns, [r["cpu_per_device_ms"] for r in results], "s-", label="CPU ms per device")
    ax2 = ax[1].twinx()
    ax2.plot(ns, [r["maxrss_mb"] for r in results], "^--", color="tab:red", label="peak RSS (MB)")
    ax2.set_ylabel("peak RSS (MB)")
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("devices")
    ax[1].set_title("time per device and memory as N grows")
    h1, l1 = ax[1].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax[1].legend(h1 + h2, l1 + l2, fontsize=8)
    ax[1].grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "fleet_scale.png", dpi=110)
    print(f"wrote {DOCS / 'fleet_scale.png'}")


if __name__ == "__main__":
    sys.exit(main())
