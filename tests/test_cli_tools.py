"""The operator's tools as a user runs them (the ``smp-gateway`` CLI in a subprocess) against
simulated devices: ``device`` (through the running daemon, serialised with its sessions, and
directly), ``check-config``, ``verify``, ``run --once --dry-run`` (never a write to a device),
``history`` and the per-device Prometheus series."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway import devkit
from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.journal import Entry
from gateway.mcuboot import parse_image
from gateway.opstate import OpState
from gateway.sim.simulator import Simulator

NEVER = {"cron": "0 0 1 1 *", "duration_s": 60, "timezone": "UTC"}
WRITES = {"upload-start", "state-write", "erase"}


async def cli(*args: str, within: float = 120) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), within)
    assert p.returncode is not None
    return p.returncode, out.decode(), err.decode()


def write_cfg(bench: Any, sim: Simulator, **top: Any) -> Path:
    data = bench.gateway_dict(sim)
    data.update(top)
    path = bench.root / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def hash_of(path: Path) -> str:
    return parse_image(path.read_bytes()).hash.hex()


def kinds(dev: Any) -> set[str]:
    return {e.kind for e in dev.events}


async def test_device_commands_through_the_daemon_and_directly(bench_factory) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    async with Simulator(bench.sim_cfg) as sim:
        path = write_cfg(bench, sim, maintenance_windows={"nightly": NEVER})
        cfg = parse_config(yaml.safe_load(path.read_text()), path)
        gw = Gateway(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        c = str(path)
        d1, d2 = sim.devices["udp-1"], sim.devices["udp-2"]
        try:
            for _ in range(200):
                if cfg.control_socket.exists():
                    break
                await asyncio.sleep(0.05)
            rc, out, err = await cli("device", "-c", c, "udp-1", "echo", "hello", "--json")
            assert rc == 0, err
            got = json.loads(out)
            assert got["via"] == "daemon" and got["result"]["echo"] == "hello"
            rc, out, _ = await cli("device", "-c", c, "udp-1", "image", "list", "--json")
            imgs = json.loads(out)["result"]["images"]
            assert imgs[0]["version"] == "1.0.0" and imgs[0]["active"] and imgs[0]["confirmed"]
            rc, out, _ = await cli("device", "-c", c, "udp-1", "os", "info", "--json")
            assert rc == 0 and "Zephyr" in json.loads(out)["result"]["os_info"]
            rc, _, err = await cli("device", "-c", c, "udp-1", "stat")
            assert rc == 1 and "SMPError" in err  # the simulated build has no stat group
            # the daemon's per-device lock: a command waits while a session holds the device
            lock = gw._port_lock(cfg.devices[0])
            await lock.acquire()
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "device", "-c", c, "udp-1", "echo", "late",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                await asyncio.wait_for(asyncio.shield(p.wait()), 3.0)
                raise AssertionError("the command ran beside a session holding the device")
            except TimeoutError:
                pass
            finally:
                lock.release()
            out_b, _ = await asyncio.wait_for(p.communicate(), 60)
            assert p.returncode == 0 and out_b.decode().strip() == "late"
            # confirm by the hash of an image the device does not run: refused, nothing sent
            rc, _, err = await cli("device", "-c", c, "udp-1", "image", "confirm",
                                   hash_of(bench.images["2.0.0"]))
            assert rc == 1 and "not the running image" in err and "--force" in err
            assert "state-write" not in kinds(d1)
            # reset: the maintenance window gate, unless --ignore-window
            boots = d1.boots
            rc, _, err = await cli("device", "-c", c, "udp-1", "reset")
            assert rc == 1 and "maintenance window" in err and d1.counters["resets"] == 0
            rc, out, err = await cli("device", "-c", c, "udp-1", "reset", "--ignore-window",
                                     "--json")
            assert rc == 0 and json.loads(out)["result"]["reset_acknowledged"] is True, err
            await d1.wait_booted(boots + 1)
            # erase while the gateway has an update of the device in progress: refused
            gw.journal.put(Entry("udp-2", step="upload", target_hash="ab" * 32,
                                 target_version="2.0.0"), "test: an update in progress")
            rc, _, err = await cli("device", "-c", c, "udp-2", "image", "erase")
            assert rc == 1 and "update of udp-2 in progress" in err
            assert "erase" not in kinds(d2)
            # intents journalled and audited
            ev = [e[3] for e in gw.journal.events("udp-1")]
            assert any(d.startswith("operator device reset --ignore-window by uid=")
                       and d.endswith("sending") for d in ev)
            assert any(a[2] == "device reset" and a[3] == "udp-1"
                       for a in gw.fleet.ops.audit_log())
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            gw.close()
        # no daemon: directly, holding the state directory
        rc, out, err = await cli("device", "-c", c, "udp-1", "echo", "direct", "--json")
        assert rc == 0 and json.loads(out)["via"] == "direct", err
        running = hash_of(bench.images["1.0.0"])
        rc, out, err = await cli("device", "-c", c, "udp-1", "image", "confirm", running, "--json")
        assert rc == 0, err
        ops = OpState(bench.root / "gateway-state" / "fleet.sqlite")
        try:
            assert any(a[2] == "device image-confirm" and "(direct)" in a[1]
                       for a in ops.audit_log())
        finally:
            ops.close()


async def test_dry_run_verify_history_metrics(bench_factory) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024,
                          versions=("1.0.0", "2.0.0", "0.9.0"))
    # 2.0.0 (18071 bytes) fits the slot, not with the trailer MCUboot needs: refused
    bench.device_overrides = {"udp-2": {"slot_size": 18200}}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        path = write_cfg(bench, sim)
        c = str(path)
        rc, out, err = await cli("run", "-c", c, "--once", "--dry-run", "--json")
        assert rc == 1, err  # something would be refused
        rows = {r["device"]: r for r in json.loads(out)["devices"]}
        assert rows["udp-1"]["action"] == "update" and rows["udp-1"]["plan"]["version"] == "2.0.0"
        assert rows["udp-1"]["running"] == "1.0.0"
        assert rows["udp-2"]["action"] == "refuse", rows["udp-2"]["why"]
        assert "too-large" in rows["udp-2"]["refusal"]
        for dev in sim.devices.values():  # never a write request to a device
            assert not kinds(dev) & WRITES, kinds(dev)
            assert dev.counters["requests.1.1"] == 0 and dev.counters["requests.0.5"] == 0
            assert dev.counters["requests.1.5"] == 0 and dev.counters["resets"] == 0
            assert dev.image_info(1) is None
        # verify: accepted with the plan / refused with the reason (exit 0 / 1)
        rc, out, err = await cli("verify", str(bench.images["2.0.0"]), "--device", "udp-1",
                                 "-c", c, "--json")
        assert rc == 0, out + err
        v = json.loads(out)
        assert v["verdict"] == "accepted" and v["plan"]["bytes"] > 16 * 1024
        assert "read from the device" in v["device_state"]
        assert all(ch["ok"] for ch in v["checks"])
        rc, out, _ = await cli("verify", str(bench.images["0.9.0"]), "--device", "udp-1", "-c", c,
                               "--json")
        v = json.loads(out)
        assert rc == 1 and v["verdict"] == "refused" and "not-newer" in v["refusal"]
        assert v["lwm2m_result"] is not None
        # the real pass: then the history and the per-device series
        cfg = parse_config(yaml.safe_load(path.read_text()), path)
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            assert res.outcomes["udp-1"].status == Status.UPDATED
            assert res.outcomes["udp-2"].status == Status.REFUSED
            text = gw.metrics.render()
        finally:
            gw.close()
        assert 'smpgw_device_last_outcome{device="udp-1",outcome="updated"} 1' in text
        assert 'smpgw_device_last_outcome{device="udp-2",outcome="refused"} 1' in text
        line = next(x for x in text.splitlines()
                    if x.startswith('smpgw_device_upload_bytes_total{device="udp-1"}'))
        assert int(float(line.split()[-1])) >= 16 * 1024
        assert 'smpgw_device_upload_rate_bytes_per_second{device="udp-1"}' in text
        assert 'smpgw_device_state{device="udp-1",step="done"} 1' in text
        rc, out, err = await cli("history", "-c", c, "--json")
        assert rc == 0, err
        att = {a["device_id"]: a for a in json.loads(out)["attempts"]}
        a1 = att["udp-1"]
        assert a1["status"] == "updated" and a1["result"] == 1 and a1["bytes"] >= 16 * 1024
        assert a1["old_version"] == "1.0.0" and a1["new_version"] == "2.0.0"
        assert a1["actor"] == "server (local)" and a1["duration_s"] > 0
        assert att["udp-2"]["status"] == "refused"
        rc, out, _ = await cli("history", "-c", c, "udp-2")
        assert rc == 0 and "udp-2 refused" in out and "udp-1" not in out


async def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("not a key")
    bad = {"state_dir": str(tmp_path / "state"), "trusted_keys": [str(key)],
           "source": {"kind": "local", "path": str(tmp_path / "nowhere")},
           "devices": [{"id": "a", "transport": {"kind": "udp", "host": "h", "port": 99999},
                        "hardware": "x"},
                       {"id": "b", "transport": {"kind": "udp", "host": "h"}, "hardware": "x",
                        "helth_check_s": 3}]}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    rc, out, _ = await cli("check-config", "-c", str(p), "--json")
    problems = json.loads(out)["problems"]
    assert rc == 2 and len(problems) == 2, problems  # both schema errors, not only the first
    assert any("devices[0].transport.port" in x for x in problems)
    assert any("helth_check_s" in x and "health_check_s" in x for x in problems)
    bad["devices"] = [{"id": "a", "transport": {"kind": "udp", "host": "h"}, "hardware": "x",
                       "health_check": {"command": ["/no/such/check"]}}]
    p.write_text(yaml.safe_dump(bad))
    rc, out, _ = await cli("check-config", "-c", str(p))
    assert rc == 2
    assert "trusted_keys[0]" in out and "source.path" in out and "/no/such/check" in out
    (tmp_path / "nowhere").mkdir()
    devkit.make_key(key, "ecdsa-p256")
    bad["devices"][0]["health_check"] = {"command": [sys.executable, "-c", "pass"]}
    p.write_text(yaml.safe_dump(bad))
    rc, out, _ = await cli("check-config", "-c", str(p))
    assert rc == 0 and out.strip().endswith(": ok"), out
