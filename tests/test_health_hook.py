"""The user-defined health check (``health_check:`` in a device config, gateway/healthhook.py):
it must pass before the gateway confirms; failing, hanging or answering wrong = not healthy =
never confirmed, the device reverted to its old image, reported rolled-back with the hook's
output. Real simulated devices, real signed images, real subprocess hooks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _slots(dev: Any) -> dict[int, Any]:
    return {s.slot: s for s in dev.server.state_images() if (s.image or 0) == 0}


def _reverted(dev: Any) -> bool:
    """The old image runs confirmed; the new one sits in slot 1, neither pending nor permanent."""
    s = _slots(dev)
    return (s[0].active and s[0].confirmed and s[0].version == "1.0.0"
            and s[1].version == "2.0.0" and not s[1].pending and not s[1].permanent)


async def test_hook_fail_hang_wrong_answer_never_confirmed_pass_confirmed(bench_factory,
                                                                           tmp_path: Path) -> None:
    env_file = tmp_path / "env.json"
    pid_file = tmp_path / "hang.pid"
    bench = bench_factory(udp=5, serial=0, image_size=16 * 1024)
    bench.device_overrides = {
        # exit 3 with a lot of output: failed, output bounded
        "udp-1": {"health_check": {"command": _py(
            "import json,os,sys; json.dump({k: v for k, v in os.environ.items() if "
            f"k.startswith('SMPGW_')}}, open({str(env_file)!r}, 'w')); "
            "print('app not ready'); sys.stdout.write('x' * 100000); sys.exit(3)"),
            "timeout_s": 20, "max_output_bytes": 200}},
        "udp-2": {"health_check": {"command": _py("print('all good')"), "timeout_s": 20}},
        # never ends: killed at its timeout, counted as failed
        "udp-3": {"health_check": {"command": _py(
            f"import os,time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
            "time.sleep(600)"), "timeout_s": 1.5}},
        "udp-4": {"health_check": {"smp": {"group": 0, "command": 7, "body": {"format": "s"},
                                           "expect_contains": "Zephyr"}}},
        "udp-5": {"health_check": {"smp": {"group": 0, "command": 7, "body": {"format": "s"},
                                           "expect_contains": "application-ok"}}},
    }
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        o = res.outcomes
        # failing command: rolled back with its (bounded) output; never confirmed
        assert o["udp-1"].status == Status.ROLLED_BACK, o["udp-1"]
        assert "exited 3" in o["udp-1"].detail and "app not ready" in o["udp-1"].detail
        assert "more bytes discarded" in o["udp-1"].detail and len(o["udp-1"].detail) < 1000
        assert _reverted(sim.devices["udp-1"])
        env = json.loads(env_file.read_text())
        assert env["SMPGW_DEVICE_ID"] == "udp-1" and env["SMPGW_VERSION"] == "2.0.0"
        assert env["SMPGW_OLD_VERSION"] == "1.0.0" and env["SMPGW_TRANSPORT"] == "udp"
        assert env["SMPGW_ADDRESS"].endswith(f":{data['devices'][0]['transport']['port']}")
        assert len(env["SMPGW_IMAGE_HASH"]) == 64
        # passing command: confirmed
        assert o["udp-2"].status == Status.UPDATED, o["udp-2"]
        s2 = _slots(sim.devices["udp-2"])
        assert s2[0].version == "2.0.0" and s2[0].active and s2[0].confirmed
        # hanging command: killed at its timeout, failed check, reverted
        assert o["udp-3"].status == Status.ROLLED_BACK, o["udp-3"]
        assert "timed out after 1.5s" in o["udp-3"].detail
        assert _reverted(sim.devices["udp-3"])
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
        # SMP request whose answer contains the expected text: confirmed; else reverted
        assert o["udp-4"].status == Status.UPDATED, o["udp-4"]
        assert o["udp-5"].status == Status.ROLLED_BACK, o["udp-5"]
        assert "does not contain 'application-ok'" in o["udp-5"].detail
        assert _reverted(sim.devices["udp-5"])
        # the failed ones are blocked (not re-attempted endlessly) and the journal says why
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            ev = [e[3] for e in gw.journal.events("udp-1")]
            assert any("not confirmed; reset so MCUboot reverts" in d for d in ev)
            assert gw.journal.get("udp-1").blocked_hash is not None
        finally:
            gw.close()


def test_health_check_config_needs_exactly_one_kind(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    base: dict[str, Any] = {"state_dir": str(tmp_path / "s"), "trusted_keys": [str(key)],
                            "source": {"kind": "local", "path": str(tmp_path)}}
    dev = {"id": "d", "transport": {"kind": "udp", "host": "127.0.0.1"}, "hardware": "h"}
    for bad in ({}, {"command": ["true"], "smp": {"group": 0, "command": 7}},
                {"command": []}, {"command": ["true"], "timeout_s": 0}):
        with pytest.raises(ConfigError, match="health_check"):
            parse_config({**base, "devices": [{**dev, "health_check": bad}]}, tmp_path / "g.yaml")
    cfg = parse_config({**base, "devices": [{**dev, "health_check": {"command": ["true"]}}]},
                       tmp_path / "g.yaml")
    hc = cfg.devices[0].health_check
    assert hc is not None and hc.timeout_s == 30.0 and hc.max_output_bytes == 4096
