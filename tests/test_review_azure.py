"""Adversarial review of the Azure IoT Hub source (#23): each test reproduces a finding and
FAILS on the reviewed code (efda6fb). Unit tests drive AzureIotHubSource with a fake SDK
client (the SDK's handlers are called as the SDK calls them); the integration test runs the
whole gateway against servers/azure_hub.py (mosquitto + Microsoft's SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import serve
from servers.azure_hub import AzureHub, hub_broker
from test_source_azure import active, entry, files_app, gw_cfg, outcome, running

from gateway.daemon import Gateway
from gateway.mcuboot import Version
from gateway.sim.simulator import Simulator
from gateway.sources.azure.source import AzureIotHubSource
from gateway.sources.base import DeviceView, FetchError
from gateway.sources.settings import AzureIotHubSourceConfig

pytestmark = pytest.mark.filterwarnings("ignore:Callback API version 1:DeprecationWarning")

SHA = "ab" * 32


class FakeClient:
    """The SDK client as the source uses it; ``twins`` are what the next GETs answer,
    ``gate`` (if set) holds a GET's answer until set."""

    def __init__(self, twin: dict[str, Any]) -> None:
        self.connected = True
        self.twin = twin
        self.gate: asyncio.Event | None = None
        self.in_get = asyncio.Event()
        self.reported: list[dict[str, Any]] = []

    async def connect(self) -> None:
        self.connected = True

    async def get_twin(self) -> dict[str, Any]:
        snapshot = {"desired": dict(self.twin["desired"]), "reported": {}}
        self.in_get.set()
        if self.gate is not None:
            await self.gate.wait()  # the answer was made before a patch, arrives after it
        return snapshot

    async def patch_twin_reported_properties(self, body: dict[str, Any]) -> None:
        self.reported.append(body)

    async def shutdown(self) -> None:
        pass


def source(tmp: Path, client: FakeClient, devices: list[tuple[str, str | None]]) -> AzureIotHubSource:
    cfg = AzureIotHubSourceConfig(kind="azure_iot_hub", connection_string="HostName=h;DeviceId=g;"
                                  "SharedAccessKey=a2V5", request_timeout_s=2)
    src = AzureIotHubSource(cfg, tmp, devices=devices)
    src._client = client
    src._loop = asyncio.get_running_loop()
    return src


def want(version: str, hw: str = "board-a") -> dict[str, Any]:
    return {"url": "https://blob.example/fw.bin?sv=1&sig=SECRET", "version": version,
            "size": 1000, "sha256": SHA, "hardware": hw}


# --- 1. device ids that map to one twin key: another device's image, reports, methods ---------
async def test_method_for_one_mcu_acts_on_another_with_colliding_twin_key(tmp_path: Path) -> None:
    """Ids ``line.1`` and ``line_1`` (both valid device ids) share the twin key ``line_1``. A
    direct method naming ``line_1`` exactly - the id the hub knows - is applied to ``line.1``
    (the first configured device whose *twin key* matches): the pause/cancel the hub meant for
    line_1 lands on the wrong MCU, and line_1 keeps installing."""
    client = FakeClient({"desired": {"$version": 1}})
    src = source(tmp_path, client, [("line.1", None), ("line_1", None)])
    calls: list[dict[str, Any]] = []

    async def control(req: dict[str, Any], actor: str) -> str:
        calls.append(req)
        return f"{req['device']} paused"

    src.set_control(control)
    status, _body = await src._answer("pause", {"mcu": "line_1"})
    assert status == 200
    assert calls[0]["device"] == "line_1", f"the hub paused line_1, the gateway paused {calls}"


async def test_desired_section_of_one_mcu_offered_to_another(tmp_path: Path) -> None:
    """``mcus.line_1`` (the hub's desired section for MCU line_1) is offered to ``line.1`` too
    (same twin key): the other device gets line_1's image, and its reports overwrite line_1's
    reported section - line_1 reads as updated while it still runs 1.0.0."""
    client = FakeClient({"desired": {"$version": 1, "mcus": {"line_1": want("2.0.0")}}})
    src = source(tmp_path, client, [("line.1", None), ("line_1", None)])
    other = DeviceView("line.1", "board-a", running_version=Version.parse("1.0.0"))
    with pytest.raises(FetchError, match=r"'line_1' and 'line.1' both map to twin section 'line_1'"):
        offer = await src.check(other)  # refused (the config refuses the pair: exit 2)
        assert offer is None, "line_1's desired image was offered to line.1"
    assert client.reported == [], "line.1 wrote into line_1's reported section"
    own = await src.check(DeviceView("line_1", "board-a", running_version=Version.parse("1.0.0")))
    assert own is not None and own.device_id == "line_1"  # the section's own MCU gets it


async def test_long_ids_sharing_a_128_char_prefix_share_a_section(tmp_path: Path) -> None:
    """twin_key truncates to 128 characters; the config allows longer ids: two MCUs whose
    ids differ after 128 characters read one desired section and write one reported one."""
    a, b = "m" * 128 + "-a", "m" * 128 + "-b"
    client = FakeClient({"desired": {"$version": 1, "mcus": {"m" * 128: want("2.0.0")}}})
    src = source(tmp_path, client, [(a, None), (b, None)])
    offers = []
    for d in (a, b):
        with pytest.raises(FetchError, match="longer than 128 characters"):  # never cut
            offers.append(await src.check(DeviceView(d, "board-a",
                                                     running_version=Version.parse("1.0.0"))))
    assert not offers and client.reported == [], "one desired section offered to two MCUs"


def test_config_refuses_ids_sharing_a_twin_section(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The fix of the three tests above at the gateway's start: two device ids (or group
    names) on one twin section, or an id too long for one, is a configuration error - one line
    naming both ids and the section, exit 2 - not a gateway that mixes up two MCUs."""
    import yaml

    from gateway.cli import main
    from gateway.config import ConfigError, parse_config

    key = tmp_path / "k.pem"
    key.write_text("x")

    def conf(ids: list[str], groups: list[str | None] | None = None) -> dict[str, Any]:
        groups = groups or [None] * len(ids)
        return {"state_dir": str(tmp_path / "s"), "trusted_keys": [str(key)],
                "source": {"kind": "azure_iot_hub", "connection_string": "HostName=h;x"},
                "devices": [{"id": i, "hardware": "hw", "group": g, "confirm": "gateway",
                             "transport": {"kind": "udp", "host": "127.0.0.1", "port": 9}}
                            for i, g in zip(ids, groups, strict=True)]}

    with pytest.raises(ConfigError, match=r"devices\[2\]\.id.*'line_1' and 'line@1' both map "
                       r"to twin section 'line_1'"):
        parse_config(conf(["a", "line_1", "line@1"]))
    with pytest.raises(ConfigError, match=r"devices\[0\]\.id.*longer than 128"):
        parse_config(conf(["m" * 129]))
    with pytest.raises(ConfigError, match=r"devices\[1\]\.group.*'p.1' and 'p:1' .*'p_1'"):
        parse_config(conf(["a", "b"], ["p.1", "p:1"]))
    parse_config(conf(["line.1", "line-1", "m" * 128]))  # distinct sections: fine
    other = conf(["line.1", "line_1"])
    other["source"] = {"kind": "local", "path": str(tmp_path)}
    parse_config(other)  # another source: no twin, no constraint
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(conf(["line.1", "line_1"])))
    assert main(["run", "--once", "-c", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "configuration error" in line and "'line_1' and 'line.1'" in line, line


@contextlib.asynccontextmanager
async def blob_rig(tmp_path: Path, bench: Any, img: bytes,
                   blob: Callable[[web.Request], Awaitable[web.Response]],
                   ) -> AsyncIterator[tuple[AzureHub, Simulator, Any]]:
    """The hub wanting ``img`` (as 2.0.0) on udp-1 from blob storage answered by ``blob``, the
    simulator, and the gateway's config (no download retries)."""
    app = web.Application()
    app.router.add_get("/blob/{name}", blob)
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(app) as base, Simulator(bench.sim_cfg) as sim):
        hub.desired = {"mcus": {"udp-1": entry(base, "v2", img)}}
        yield hub, sim, gw_cfg(bench, sim, hub, download_retries=0)


# --- 2. the blob's SAS token in the reported properties and the logs -------------------------
async def test_sas_token_leaks_through_aiohttp_error_into_reported_reason(
        bench_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``shown()`` strips the query from the URL the gateway formats itself, but the download's
    FetchError also carries ``str(exc)`` of aiohttp's own error: a blob endpoint that redirects
    in a loop (TooManyRedirects - a ClientResponseError, whose text holds ``url='...'`` with the
    full query) puts the SAS token into the reported ``reason``/``last_outcome`` on the hub and
    into the gateway's log."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()

    async def loop_redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(request.rel_url))  # the same blob, the same SAS query

    async with blob_rig(tmp_path, bench, img, loop_redirect) as (hub, sim, cfg):
        gw = Gateway(cfg)
        try:
            await asyncio.wait_for(gw.run_once(), 60)
        finally:
            gw.close()
        assert active(sim.devices["udp-1"]) == ("1.0.0", True)
    assert outcome(hub, "udp-1").get("result_name"), hub.reported
    assert "SECRET" not in json.dumps(hub.reported), outcome(hub, "udp-1")["reason"]
    assert "SECRET" not in caplog.text


# --- 3. a transient failure parks the MCU for good ------------------------------------------
async def test_transient_blob_outage_declines_the_offer_forever(bench_factory: Any,
                                                                tmp_path: Path) -> None:
    """Blob storage answers 503 for a moment (longer than the download's retries): the final
    CONNECTION_LOST outcome makes ``report()`` put the desired version in ``_declined``, so
    ``check()`` never offers it again - the MCU stays on the old firmware until someone changes
    the desired version or calls update_now, although the gateway's retry policy is set and
    the blob is back. (A network blip parks a whole fleet.)"""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    fails = [1]

    async def blob(request: web.Request) -> web.Response:
        if fails[0] > 0:
            fails[0] -= 1
            return web.Response(status=503)
        return web.Response(body=img)

    async with blob_rig(tmp_path, bench, img, blob) as (hub, sim, cfg):
        async with running(cfg) as gw:
            await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name")
                                    == "CONNECTION_LOST", 30)
            assert fails[0] <= 0
            try:
                await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name")
                                        == "SUCCESS", 20)
            except TimeoutError:
                pass
            declined = dict(gw.source._declined)  # type: ignore[attr-defined]
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), (
            f"never retried after the blob came back; declined={declined}")


# --- 4. twin re-reads pile up without bound while GETs go unanswered --------------------------
async def test_refresh_tasks_pile_up_while_twin_get_unanswered(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every desired patch with a ``$version`` gap (or none) spawns its own whole-twin read;
    the reads queue on ``_twin_lock`` and each waits up to request_timeout_s for a GET the hub
    does not answer. Patches are admitted at max_patches_per_minute (120), reads drain at one
    per request_timeout_s: the queue of tasks (each holding a coroutine) grows by ~118 a minute
    for as long as the condition lasts - not bounded. Ten minutes of such patches (time faked)
    leave hundreds of pending re-reads where one would do."""
    import gateway.sources.azure.source as mod

    client = FakeClient({"desired": {"$version": 1}})
    client.gate = asyncio.Event()  # GETs never answered
    src = source(tmp_path, client, [("line_1", None)])
    now = [1000.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(mod, "time", Clock)
    for _minute in range(10):
        for _ in range(120):
            src._on_patch({"mcus": {"line_1": {"note": "x"}}})  # no $version: a gap
            now[0] += 0.5
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    pending = len(src._tasks)
    client.gate.set()
    for t in list(src._tasks):
        t.cancel()
    assert pending <= 2, f"{pending} whole-twin reads queued"


# --- 5. the hub unreachable at the first connection ------------------------------------------
async def test_hub_down_at_start_parks_every_mcu(bench_factory: Any, tmp_path: Path) -> None:
    """The hub (broker) is down when the gateway starts and back ~15 s later. In ``_connected``
    the handler setters (``client.on_..._received = ...``) enable SDK features, which connects:
    their ConnectionFailedError escapes raw (not a FetchError CONNECTION_LOST), so the daemon
    counts the hub's outage as the *device's* failure (not ``_server_side``) and parks the MCU
    for an hour after 5 such failures; the client is never kept (a new SDK client is made and
    leaked at every attempt). The update does not happen within a minute of the hub's return."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        hub.desired = {"mcus": {"udp-1": entry(base, "v2", img)}}
        await broker.stop()
        async with running(gw_cfg(bench, sim, hub, request_timeout_s=2)) as gw:
            # a short hub outage at boot: five failed checks (the retry policy's max_attempts)
            def errors() -> float:
                return gw.metrics.get("source_errors_total", source="azure_iot_hub", op="check")

            for _ in range(400):
                if errors() >= 5:
                    break
                await asyncio.sleep(0.1)
            assert errors() >= 5
            assert gw.source_health.failures >= 1, "the hub's outage counted against the device"
            await broker.start()
            await hub.wait_reported(
                lambda r: outcome(hub, "udp-1").get("result_name") == "SUCCESS", 60)
        assert active(sim.devices["udp-1"]) == ("2.0.0", True)


async def test_sdk_handler_setter_blocks_the_event_loop(tmp_path: Path) -> None:
    """The SDK's receive-handler setters are synchronous (``fut.result()`` on the SDK's loop
    thread until the feature is enabled, i.e. connected and subscribed) and ``_connected`` calls
    them on the gateway's event loop, outside any ``wait_for``: a hub endpoint that accepts the
    TCP connection and says nothing freezes the WHOLE daemon (every SMP session, timer, ctl)
    for paho's 5 s connect timeout - and for the SDK's 60 s operation timeout when TLS
    completes but CONNACK never comes (measured: 60.0 s stall with request_timeout_s=3) - at
    every check, since the failed client is not kept."""
    import socket
    import threading
    import time

    from servers.azure_hub import _free_loopback, make_tls

    ip = _free_loopback()
    tls = make_tls(tmp_path, ip)
    srv = socket.socket()
    srv.bind((ip, 8883))
    srv.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(srv.accept()[0])  # accepted, never answered

    threading.Thread(target=accept, daemon=True).start()
    cfg = AzureIotHubSourceConfig(kind="azure_iot_hub", connection_string=(
        f"HostName={ip};DeviceId=gw;SharedAccessKey=a2V5"), server_verification_cert=tls.ca,
        request_timeout_s=1)
    src = AzureIotHubSource(cfg, tmp_path / "state", devices=[("d1", None)])
    await src.start()
    stalls: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            stalls.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.1)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(src.check(DeviceView("d1", "hw")), 1.5)
    await asyncio.sleep(0.2)
    tick.cancel()
    srv.close()
    for s in held:
        s.close()
    with contextlib.suppress(Exception):
        await src.close()
    assert max(stalls) < 1.0, f"the gateway's event loop stood still for {max(stalls):.1f}s"


async def test_hub_unreachable_is_a_source_outage_with_one_client(tmp_path: Path) -> None:
    """The hub refuses connections: every check fails with FetchError CONNECTION_LOST (the
    daemon's source outage, not the device's failure), the ONE SDK client is kept and tried
    again - no new client, no new SDK threads per attempt (bounded over repeated failures)."""
    import threading

    from servers.azure_hub import _free_loopback, make_tls

    from gateway.sources.base import UpdateResult

    ip = _free_loopback()  # nobody listens on ip:8883: connection refused
    tls = make_tls(tmp_path, ip)
    cfg = AzureIotHubSourceConfig(kind="azure_iot_hub", connection_string=(
        f"HostName={ip};DeviceId=gw;SharedAccessKey=a2V5"), server_verification_cert=tls.ca,
        request_timeout_s=2)
    src = AzureIotHubSource(cfg, tmp_path / "state", devices=[("d1", None)])
    await src.start()
    clients, threads = [], []
    try:
        for _ in range(8):
            with pytest.raises(FetchError) as ei:
                await src.check(DeviceView("d1", "hw"))
            assert ei.value.result == UpdateResult.CONNECTION_LOST, ei.value
            clients.append(src._client)
            threads.append(threading.active_count())
    finally:
        await src.close()
    assert clients[0] is not None and all(c is clients[0] for c in clients)
    assert max(threads[2:]) <= threads[1] + 1, f"threads per attempt: {threads}"


# --- fixes: refusals only decline; coalesced re-reads; a pending cancel; durable state --------
async def test_only_final_refusals_decline_the_desired_version(tmp_path: Path) -> None:
    """A lost link (blob storage, the device) is retried by the gateway's retry policy; a
    refusal (hardware, downgrade, signature, checksum, 404, a rolled-back image) declines the
    desired version until it changes - and that survives a restart (state.json)."""
    from gateway.sources.base import Offer, Report, UpdateResult, UpdateState

    client = FakeClient({"desired": {"$version": 1}})
    src = source(tmp_path, client, [("m1", None)])
    cases = [(UpdateResult.CONNECTION_LOST, "failed: download of https://blob/x?... failed", False),
             (UpdateResult.UPDATE_FAILED, "failed: SMPTimeout: no answer", False),
             (UpdateResult.OUT_OF_RAM, "failed: device busy", False),
             (UpdateResult.UNSUPPORTED_PACKAGE, "refused: signature", True),
             (UpdateResult.INTEGRITY_FAILURE, "failed: sha256 mismatch", True),
             (UpdateResult.INVALID_URI, "failed: artifact URL answered HTTP 404", True),
             (UpdateResult.NOT_ENOUGH_FLASH, "refused: too large", True),
             (UpdateResult.UPDATE_FAILED, "rolled-back: the test boot failed", True)]
    for i, (result, detail, declines) in enumerate(cases):
        src._declined.clear()
        vs = f"2.0.{i}"
        offer = Offer("m1", src.name, f"a{i}", report_to={"mcu": "m1", "version": vs})
        await src.report(offer, Report(UpdateState.IDLE, result, detail=detail))
        assert (src._declined.get("m1") == vs) is declines, (result, detail)
        reread = AzureIotHubSource(src.cfg, tmp_path, devices=[("m1", None)])
        assert (reread._declined.get("m1") == vs) is declines  # persisted as decided
    assert client.reported[-1]["mcus"]["m1"]["last_outcome"]["result_name"] == "UPDATE_FAILED"


async def test_coalesced_twin_read_still_happens_once_the_hub_answers(tmp_path: Path) -> None:
    """Gaps while a GET is unanswered make ONE pending read, not none: once the hub answers,
    the cached desired properties are the hub's again (two reads at most)."""
    client = FakeClient({"desired": {"$version": 7, "mcus": {"line_1": want("2.0.0")}}})
    client.gate = asyncio.Event()
    src = source(tmp_path, client, [("line_1", None)])
    src._on_patch({"mcus": {"line_1": {"note": "x"}}})  # no $version: a gap, a read
    await client.in_get.wait()
    for _ in range(50):  # more gaps while that GET is unanswered
        src._on_patch({"mcus": {"line_1": {"note": "x"}}})
    assert len(src._tasks) == 1 and src._refresh_again
    client.gate.set()
    assert src._refreshing is not None
    await asyncio.wait_for(src._refreshing, 10)
    assert src.stats["twin_reads"] == 2 and src._fresh and src._desired_version == 7
    assert src._desired["mcus"]["line_1"]["version"] == "2.0.0"


async def test_pending_cancel_is_raised_after_its_section_was_removed(tmp_path: Path) -> None:
    """The hub canceled (persisted, the gateway restarted before journalling it), then removed
    the MCU's desired section: the cancel is still raised for the gateway to journal and
    acknowledge - not forgotten in state.json for ever."""
    from gateway.sources.base import ServerCanceled

    state = tmp_path / "azure" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"cancels": {"m1": {"version": "2.0.0", "reason": "by hub"}}}))
    client = FakeClient({"desired": {"$version": 3, "mcus": {"other": want("2.0.0")}}})
    src = source(tmp_path, client, [("m1", None), ("other", None)])
    with pytest.raises(ServerCanceled) as ei:
        await src.check(DeviceView("m1", "board-a", running_version=Version.parse("1.0.0")))
    assert ei.value.offer.report_to == {"mcu": "m1", "version": "2.0.0"}
    await src.acknowledge_cancel(ei.value.offer, True, "nothing was installed")
    assert json.loads(state.read_text())["cancels"] == {}
    assert client.reported[-1]["mcus"]["m1"]["canceled"] is True
    assert await src.check(DeviceView("m1", "board-a",
                                      running_version=Version.parse("1.0.0"))) is None


def test_state_is_fsynced_before_and_after_the_rename(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    src = AzureIotHubSource(AzureIotHubSourceConfig(
        kind="azure_iot_hub", connection_string="HostName=h;DeviceId=g;SharedAccessKey=a2V5"),
        tmp_path, devices=[("m1", None)])
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    src._cancels["m1"] = {"version": "2.0.0", "reason": "r"}
    src._save_state()
    state = tmp_path / "azure" / "state.json"
    assert synced == [str(state.with_suffix(".tmp")), str(state.parent)], synced
    assert oct(state.stat().st_mode & 0o777) == "0o600"


async def test_update_now_during_the_refusal_report_is_not_lost(tmp_path: Path) -> None:
    """update_now answered while the hub is still taking the refusal's report: the refusal
    must not decline the version afterwards (the hub asked again) - the next check offers
    (here: refuses and reports) it again instead of staying silent."""
    client = FakeClient({"desired": {"$version": 1, "mcus": {"m1": want("3.0.0", hw="x")}}})
    gate, in_patch = asyncio.Event(), asyncio.Event()
    plain = client.patch_twin_reported_properties

    async def slow_patch(body: dict[str, Any]) -> None:
        if "result_name" in json.dumps(body):
            in_patch.set()
            await gate.wait()  # the hub has it, its answer is on the way
        await plain(body)

    client.patch_twin_reported_properties = slow_patch  # type: ignore[method-assign]
    src = source(tmp_path, client, [("m1", None)])
    asked: list[dict[str, Any]] = []

    async def control(req: dict[str, Any], actor: str) -> str:
        asked.append(req)
        return "update check now"

    src.set_control(control)
    dev = DeviceView("m1", "board-a", running_version=Version.parse("1.0.0"))
    check = asyncio.create_task(src.check(dev))
    await in_patch.wait()
    assert (await src._answer("update_now", {"mcu": "m1"}))[0] == 200
    gate.set()
    assert await check is None
    assert "m1" not in src._declined, "update_now lost: the refusal declined it afterwards"
    n = len(client.reported)
    assert await src.check(dev) is None  # refused again, and reported again
    assert any("hardware 'x'" in json.dumps(b) for b in client.reported[n:])


async def test_a_drop_seen_only_as_connected_still_rereads_the_twin(tmp_path: Path) -> None:
    """CI, loaded machine: the broker restarted and the SDK reconnected before the loop ran the
    "disconnected" callback, so both callbacks read ``client.connected`` as True - the drop
    was never seen, the missed patch never re-read, the update waited for the 600 s poll. Any
    "connected" after the first is a reconnect; the state is the one the SDK saw."""
    client = FakeClient({"desired": {"$version": 1}})
    src = source(tmp_path, client, [("udp-1", None)])
    src._on_connection(True)  # the first connection: the check that made it reads the twin
    assert src._refreshing is None
    src._on_connection(True)  # "disconnected", read only after the SDK was connected again
    src._on_connection(True)  # "connected"
    assert src._refreshing is not None
    await src._refreshing
    assert src.stats["twin_reads"] == 1
    first = src._refreshing
    src._sdk_connection()  # the SDK thread passes the state it saw at the change
    await asyncio.sleep(0)  # call_soon_threadsafe: the callback runs at the loop's next turn
    assert src._refreshing is not first
    await src._refreshing
    assert src.stats["twin_reads"] == 2
