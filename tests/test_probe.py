"""``smp-gateway probe`` against a simulated device: the real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import json
import sys

import yaml

from gateway.sim.simulator import Simulator


async def _cli(*args: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args,
                                             stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode or 0, out.decode(), err.decode()


async def test_probe_udp_prints_identity_slots_upload_and_stanzas(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0)
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        ep = dev.endpoint()
        rc, out, err = await _cli("probe", "--udp", f"{ep['host']}:{ep['port']}", "--json")
        assert rc == 0, err
        data = json.loads(out)
        assert data["identity"] == {"node": "udp-1", "board": "sim_board"}
        active = next(s for s in data["facts"]["slots"] if "active" in s["flags"])
        assert active["version"] == "1.0.0" and "confirmed" in active["flags"]
        assert data["facts"]["mcuboot_mode"] == "swap-using-scratch"
        params = data["facts"]["params"]
        start = data["upload_start"]
        assert start["window"] == params["buf_count"] - 1 and start["source"] == "params"
        assert start["packet_limit"] <= params["buf_size"]
        assert any("buf_count-1" in w for w in start["why"])
        assert data["devices_entry"]["transport"] == {"kind": "udp", "host": ep["host"],
                                                       "port": ep["port"]}
        assert data["template_entry"]["match"] == {"transport": "udp", "board": "sim_board"}
        # human form with -v: the stanzas are valid YAML and every SMP exchange is logged
        rc, out, err = await _cli("-v", "probe", "--udp", f"{ep['host']}:{ep['port']}")
        assert rc == 0, err
        stanza = out[out.index("# devices: entry"):out.index("# or a device_templates")]
        assert yaml.safe_load(stanza)["devices"][0]["hardware"] == "sim_board"
        assert "smp ImageStatesRead op=0 group=1 cmd=0" in err and "rtt=" in err
        # probing never writes: no upload, no state change, no reset
        assert dev.image_info(1) is None and dev.counters["resets"] == 0
