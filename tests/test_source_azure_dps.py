"""Azure IoT Hub through the Device Provisioning Service: the azure_iot_hub source's ``dps:``
on Microsoft's SDK against ``servers/azure_hub.py``'s ``AzureDps`` (DPS's device-side MQTT API
as Microsoft documents it) on the test mosquitto's second TLS address, which assigns the hub
(the ``AzureHub`` responder's address): DPS slow (202 + retry-after for ever) is bounded by
``dps.timeout_s``, then the assignment -> the gateway connects to the assigned hub -> an update
-> reported success; a refused enrollment is one line naming the key, exit 2, no traceback;
404, a failed registration, a hostile assignment and X.509 attestation on the source itself.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet_servers.common import serve
from servers.azure_hub import AzureDps, AzureHub, hub_broker, make_tls
from test_source_azure import active, entry, files_app, gw_cfg, outcome, running

from gateway.config import ConfigError
from gateway.sim.simulator import Simulator
from gateway.sources.azure import AzureIotHubSource
from gateway.sources.base import FetchError
from gateway.sources.settings import AzureIotHubSourceConfig

if not os.environ.get("CI"):  # in CI (the test extra installs the SDK) a failure, never a skip
    pytest.importorskip("azure.iot.device")
pytestmark = pytest.mark.filterwarnings("ignore:Callback API version 1:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
KEY = "dGVzdC1rZXktbm90LWNoZWNrZWQtYnktbW9zcXVpdHRv"


def dps_source(broker: Any, **dps: Any) -> dict[str, Any]:
    return {"kind": "azure_iot_hub", "server_verification_cert": str(broker.tls.ca),
            "dps": {"provisioning_host": broker.dps_ip, "id_scope": "0ne00TEST",
                    "symmetric_key": KEY, "timeout_s": 10, **dps}}


async def test_dps_slow_bounded_then_assigned_hub_takes_an_update(bench_factory: Any,
                                                                  tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    async with (hub_broker(tmp_path, dps=True) as broker, AzureHub(broker) as hub,
                AzureDps(broker, hub=broker.ip, answer="slow") as dps,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        src_cfg = dps_source(broker, timeout_s=3)
        cfg = gw_cfg(bench, sim, hub, **{k: v for k, v in src_cfg.items() if k != "kind"},
                     connection_string=None)
        hub.desired = {"mcus": {"udp-1": entry(base, "v2", img)}}
        t0 = time.monotonic()
        async with running(cfg) as gw:
            dev = sim.devices["udp-1"]
            await dev.wait_for(lambda _d: gw.source_health.down, 20)
            took = time.monotonic() - t0
            # start and the first check each gave up after dps.timeout_s (3 s)
            assert 6 <= took < 15, took
            assert "source.dps.timeout_s" in gw.source_health.last_error
            assert dps.polls >= 1  # the SDK polled as told (202 + retry-after), then was cut
            assert dev.counters["upload_bytes_received"] == 0
            dps.answer = "assign"  # DPS answers now: the source's next probe is assigned
            await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name")
                                    == "SUCCESS", 40)
            src: Any = gw.source
            assert src._assigned == (broker.ip, dps.device_id)  # the assigned hub, not DPS's
            assert dps.registrations[-1]["registrationId"] == bench.gateway_dict(sim)["gateway_id"]
        assert active(sim.devices["udp-1"]) == ("2.0.0", True)


async def test_dps_refused_is_one_line_naming_the_key_exit_2(bench_factory: Any,
                                                             tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    async with (hub_broker(tmp_path, dps=True) as broker,
                AzureDps(broker, hub=broker.ip, answer=401) as dps):
        conf = tmp_path / "gateway.yaml"
        conf.write_text(yaml.safe_dump({
            "state_dir": str(tmp_path / "state"), "trusted_keys": [str(bench.key)],
            "source": dps_source(broker),
            "devices": [{"id": "m1", "hardware": "hw", "transport": {
                "kind": "udp", "host": "127.0.0.1", "port": 9}}]}))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "-c", str(conf),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        text = err.decode()
        assert proc.returncode == 2, text  # README: 2 = configuration or usage error
        assert "Traceback" not in text and "Traceback" not in out.decode(), text
        (line,) = [x for x in text.splitlines() if "configuration error" in x]
        assert "source.dps.symmetric_key" in line and "401" in line, line
        assert KEY not in text  # the secret is never printed
        assert len(dps.registrations) == 1

        # on the source itself: 404, a failed registration, a hostile assignment, X.509
        def source(**dps_kw: Any) -> AzureIotHubSource:
            cfg = AzureIotHubSourceConfig.model_validate(dps_source(broker, **dps_kw))
            return AzureIotHubSource(cfg, tmp_path / "s", gateway_id="gw-7", config_path=conf)

        dps.answer = 404
        with pytest.raises(ConfigError, match=r"source\.dps\.registration_id.*'gw-7'.*404"):
            await source().start()
        dps.answer, dps.registration_state = "assign", {"status": "failed", "errorCode": 400}
        with pytest.raises(ConfigError, match=r"source\.dps: .*registration failed"):
            await source().start()
        dps.registration_state = {"assignedHub": "evil host/" + "x" * 300}
        with pytest.raises(FetchError, match="unusable hub host name"):
            await source()._provision()
        dps.registration_state = None
        (tmp_path / "x509").mkdir()
        tls = make_tls(tmp_path / "x509", "127.0.0.1")  # a certificate + key: X.509 attestation
        src = source(symmetric_key=None, cert_file=str(tls.cert), key_file=str(tls.key))
        await src.start()
        assert src._assigned == (broker.ip, dps.device_id)
