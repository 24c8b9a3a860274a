"""Azure IoT Hub group sections (``desired.groups.<group>``) against the hub of
``servers/azure_hub.py`` with simulator devices: a group is updated all-or-nothing, reported
per MCU; a member's own ``mcus.<id>`` section replaces its group's for that member - and when
it cannot be taken (refused, unusable), no member of the group starts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import serve
from servers.azure_hub import AzureHub, hub_broker
from test_source_azure import active, entry, gw_cfg, mcu, outcome, running

from gateway.mcuboot import Version
from gateway.sim.simulator import Simulator
from gateway.sources.azure import AzureIotHubSource
from gateway.sources.base import DeviceView
from gateway.sources.settings import AzureIotHubSourceConfig

if not os.environ.get("CI"):  # in CI (the test extra installs the SDK) a failure, never a skip
    pytest.importorskip("azure.iot.device")
pytestmark = pytest.mark.filterwarnings("ignore:Callback API version 1:DeprecationWarning")


def blobs_app(blobs: dict[str, bytes], hits: dict[str, int]) -> web.Application:
    async def get(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        return web.Response(body=blobs[name])

    app = web.Application()
    app.router.add_get("/blob/{name}", get)
    return app


def events(dev: Any, kind: str, version: str | None = None) -> list[Any]:
    return [e for e in dev.events if e.kind == kind
            and (version is None or e.detail.get("version") == version)]


async def test_group_section_all_or_nothing_own_section_wins(bench_factory: Any,
                                                              tmp_path: Any) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024,
                          versions=("1.0.0", "2.0.0", "3.0.0", "4.0.0"))
    bench.device_overrides = {"udp-1": {"group": "pumps"}, "udp-2": {"group": "pumps"}}
    img = {v: bench.images[v].read_bytes() for v in ("2.0.0", "3.0.0", "4.0.0")}
    hits: dict[str, int] = {}
    blobs = {"grp2": img["2.0.0"], "own2": img["2.0.0"], "v3": img["3.0.0"], "v4": img["4.0.0"]}
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(blobs_app(blobs, hits)) as base, Simulator(bench.sim_cfg) as sim):
        one, two = sim.devices["udp-1"], sim.devices["udp-2"]
        hw = one.cfg.hardware
        # 1. one group section for both; udp-2's own section (another URL, no sha256: not the
        # group's download) replaces it for udp-2
        own = {k: v for k, v in entry(base, "own2", img["2.0.0"]).items() if k != "sha256"}
        hub.desired = {"groups": {"pumps": entry(base, "grp2", img["2.0.0"], hardware=hw)},
                       "mcus": {"udp-2": own}}
        async with running(gw_cfg(bench, sim, hub)) as gw:
            await hub.wait_reported(lambda r: all(
                outcome(hub, d).get("result_name") == "SUCCESS" for d in ("udp-1", "udp-2")), 40)
            assert hits == {"grp2": 1, "own2": 1}  # each member from its own section
            assert active(one) == active(two) == ("2.0.0", True)
            rec = gw.journal.group("pumps")
            assert rec is not None and rec.phase == "done" and set(rec.members) == {"udp-1", "udp-2"}
            # together: neither member booted 2.0.0 before both held the image
            assert max(e.t for d in (one, two) for e in events(d, "upload-done")) < min(
                e.t for d in (one, two) for e in events(d, "boot", "2.0.0"))
            await hub.wait_reported(lambda r: all(  # the inventory, per MCU, at the next check
                mcu(hub, d).get("running_version") == "2.0.0" for d in ("udp-1", "udp-2")), 20)

            # 2. udp-2's own section conflicts (other hardware): refused, so NO member starts
            uploaded = {d.id: d.counters["upload_bytes_received"] for d in (one, two)}
            await hub.set_desired({"groups": {"pumps": entry(base, "v3", img["3.0.0"],
                                                             version="3.0.0", hardware=hw)},
                                   "mcus": {"udp-2": entry(base, "v3", img["3.0.0"],
                                                           version="3.0.0", hardware="other")}})
            await hub.wait_reported(lambda r: all(
                outcome(hub, d).get("version") == "3.0.0" for d in ("udp-1", "udp-2")), 30)
            assert outcome(hub, "udp-2")["result_name"] == "UNSUPPORTED_PACKAGE"
            assert "hardware 'other'" in outcome(hub, "udp-2")["reason"]
            assert outcome(hub, "udp-1")["result_name"] != "SUCCESS"
            assert "group pumps not started: member udp-2" in outcome(hub, "udp-1")["reason"]
            assert {d.id: d.counters["upload_bytes_received"] for d in (one, two)} == uploaded
            assert active(one) == active(two) == ("2.0.0", True)

            # 3. udp-2's own section is unusable: nobody starts (retried, not blocked) until
            # the hub removes it (null deletes it): then both follow the group section together
            n = len(hub.reported_patches)
            await hub.set_desired({"groups": {"pumps": entry(base, "v4", img["4.0.0"],
                                                             version="4.0.0", hardware=hw)},
                                   "mcus": {"udp-2": {"version": "4.0.0", "url": "ftp://x/y"}}})
            await hub.wait_reported(lambda r: sum(
                "unusable desired section" in str(p) for p in hub.reported_patches[n:]) >= 2, 30)
            assert {d.id: d.counters["upload_bytes_received"] for d in (one, two)} == uploaded
            await hub.set_desired({"mcus": {"udp-2": None}})
            await hub.wait_reported(lambda r: all(
                outcome(hub, d).get("result_name") == "SUCCESS"
                and outcome(hub, d).get("version") == "4.0.0" for d in ("udp-1", "udp-2")), 40)
            assert active(one) == active(two) == ("4.0.0", True)
            assert gw.journal.group("pumps").phase == "done"  # type: ignore[union-attr]


async def test_patch_between_two_members_checks_does_not_split_the_group(tmp_path: Any) -> None:
    """The members of a group are checked one after the other (each after its own device
    read); a desired patch landing in between must not offer the new version to the second
    member only - it would go alone. Deterministic: the patch is applied between the checks."""
    cfg = AzureIotHubSourceConfig.model_validate({"kind": "azure_iot_hub",
                                                  "connection_string": "HostName=x;DeviceId=y"})
    src = AzureIotHubSource(cfg, tmp_path, devices=[("a", "pumps"), ("b", "pumps"), ("c", None)])
    v2 = {"url": "https://blob/x", "version": "2.0.0"}
    v3 = {"url": "https://blob/y", "version": "3.0.0"}
    src._take({"groups": {"pumps": v2}, "mcus": {"c": v2}}, 5)
    src._fresh = True  # the twin was read (no connection needed for what follows)

    def view(dev: str) -> DeviceView:
        v = DeviceView(dev, "hw", Version.parse("2.0.0"), group=None if dev == "c" else "pumps")
        src._inventory_sent[dev] = json.dumps({"running_version": "2.0.0", "hardware": "hw",
                                               "slots": None}, sort_keys=True)
        return v

    assert await src.check(view("a")) is None  # runs 2.0.0
    src._on_patch({"groups": {"pumps": v3}, "mcus": {"c": v3}, "$version": 6})
    assert src._fresh and src._desired_version == 6
    assert await src.check(view("b")) is None  # the same round: what "a" was offered
    got_c = await src.check(view("c"))  # a lone device reads the live twin
    assert got_c is not None and str(got_c.version) == "3.0.0"
    for dev in ("a", "b"):  # the next round: both members see 3.0.0
        got = await src.check(view(dev))
        assert got is not None and str(got.version) == "3.0.0", dev
