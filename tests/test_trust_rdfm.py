"""RDFM against the loopback server: what a fleet-server outage, an unusable artifact and an
update's inventory do to the gateway, and what ``status`` says about it.

- A server that refuses connections or answers 500 backs off the *source*: no device is
  counted as failing nor parked, and when the server is back the devices are updated at once.
  A device that really fails is parked, and ``status`` / ``status --json`` / ``ctl list`` show
  until when.
- An artifact whose bytes match the server's sha256 but cannot be used (truncated) is refused
  and blocked by that sha256: downloaded once, reported once, named by what was refused.
- ``status`` shows the current attempt's target and outcome, not the previous update's.
- RDFM stores metadata at authentication only: a changed running version is sent by
  authenticating again at the next check, not at token expiry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from fleet_servers.common import serve
from fleet_servers.rdfm import RdfmServer

from gateway.artifacts.mender import build_zephyr_artifact
from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.slow

VERSIONS = ("1.0.0", "2.0.0", "3.0.0")


def cfg_of(bench: Any, sim: Simulator, base: str, *,
           extra_devices: list[dict[str, Any]] | None = None, **top: Any) -> Any:
    data = bench.gateway_dict(sim)
    data["devices"] += extra_devices or []
    data["source"] = {"kind": "rdfm", "url": base, "key_bits": 2048, "poll_interval_s": 0.3,
                      "request_timeout_s": 5, "download_retries": 0}
    data.update(top)
    path = bench.root / "gateway.yaml"  # the file ``status`` (another process) reads
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return parse_config(data, path)


def write_cfg(cfg: Any, bench: Any) -> Path:
    return Path(cfg.config_path)


def status(cfg_path: Path, *extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "-c", str(cfg_path),
                          "--offline", *extra], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def status_json(cfg_path: Path) -> dict[str, Any]:
    return dict(json.loads(status(cfg_path, "--json")))


def record(doc: dict[str, Any], dev_id: str) -> dict[str, Any]:
    return next(d for d in doc["devices"] if d["device"] == dev_id)


def active_version(dev: Any) -> str:
    """The running version ('' while the simulated device is resetting)."""
    act = next((s for s in dev.server.state_images() if s.active), None)
    return str(act.version) if act is not None else ""


def artifact(bench: Any, version: str, cut: Callable[[bytes], bytes] | None = None) -> bytes:
    img = bench.images[version].read_bytes()
    return build_zephyr_artifact(img, device_types=["sim_board"], version=version) if cut is None \
        else cut(img)


async def until(pred: Callable[[], bool], within: float, what: str) -> None:
    """Wait for a condition of the running daemon (checked every 20 ms), bounded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def register(srv: RdfmServer, cfg: Any, ids: list[str]) -> None:
    """First contact registers each device (pending); an operator accepts them."""
    gw = Gateway(cfg)
    try:
        await gw.run_once()
    finally:
        gw.close()
    for i in ids:
        srv.accept(i)


# -- A: an outage backs off the source, not the devices ----------------------------------------
async def test_server_outage_backs_off_the_source_not_the_devices(bench_factory: Any) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024, versions=VERSIONS)
    srv = RdfmServer()
    # bound but not listening: connections are refused until the server starts on it
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    runner = web.AppRunner(srv.app(), access_log=None)
    await runner.setup()
    max_attempts = 2
    async with Simulator(bench.sim_cfg) as sim:
        ids = list(sim.devices)
        cfg = cfg_of(bench, sim, base, retry={"max_attempts": max_attempts, "base_s": 0.05,
                                              "max_s": 0.4, "park_s": 3600})
        cfg_path = write_cfg(cfg, bench)
        gw = Gateway(cfg)
        stop = asyncio.Event()
        daemon = asyncio.create_task(gw.run_forever(stop))
        def check_errors() -> float:
            return gw.metrics.get("source_errors_total", source="rdfm", op="check")

        try:
            # connection refused, for well over max_attempts polls of each device
            await until(lambda: check_errors() >= len(ids) * (max_attempts + 2), 30,
                        "failed checks")
            assert gw.metrics.get("retries_total") == 0  # no device backoff, no park
            assert all(gw.journal.get(i).attempts == 0 for i in ids)
            h = gw.source_health
            assert gw.retry_state == {} and h.failures >= max_attempts + 1
            assert "source=rdfm:backing-off" in gw.status_line()
            doc = status_json(cfg_path)
            (src,) = doc["sources"]
            assert src["state"] == "backing-off" and src["failures"] >= max_attempts + 1
            assert "unreachable" in (src["last_error"] or "") or "failed" in (src["last_error"] or "")
            assert all(record(doc, i)["parked"] is None for i in ids)
            assert "source rdfm: unreachable since" in status(cfg_path)
            rows = gw.fleet.list_devices()  # ctl list (a device mid-attempt has no backoff row)
            assert all(r["parked"] is None for r in rows)
            assert any((r["source_backoff"] or {}).get("state") == "backing-off" for r in rows)

            # the server comes up: one probe gets through and every device goes at once
            await web.SockSite(runner, sock).start()
            await until(lambda: len(srv.registrations) == len(ids), 10, "registrations")
            assert not h.down
            for i in ids:
                srv.accept(i)
                srv.assign(i, artifact(bench, "2.0.0"), "2.0.0", "sim_board")
            await until(lambda: all(active_version(sim.devices[i]) == "2.0.0"
                                    and gw.journal.get(i).outcome == "updated" for i in ids),
                        60, "devices updated to 2.0.0")
            attempts = {i: gw.journal.get(i).attempts for i in ids}

            # a 500 outage: the same, and the server is asked once per backoff round
            srv.outage, errors0 = 500, check_errors()
            await until(lambda: check_errors() - errors0 >= len(ids) * (max_attempts + 2)
                        and h.failures >= max_attempts + 2, 30, "failed checks (500)")
            assert gw.retry_state == {} and gw.metrics.get("retries_total") == 0
            assert {i: gw.journal.get(i).attempts for i in ids} == attempts
            assert all(gw.journal.get(i).last_error is None for i in ids)
            # one check per backoff round (plus those in flight when it began); the final
            # reports of the update just done: a try or two each, then they wait for the source
            checks = [p for p in srv.outage_hits if p != "/api/v1/logs"]
            assert len(checks) <= h.failures + 2 * len(ids), (srv.outage_hits, h.failures)
            assert len(srv.outage_hits) - len(checks) <= 2 * len(ids), srv.outage_hits
            for i in ids:
                srv.assign(i, artifact(bench, "3.0.0"), "3.0.0", "sim_board")
            srv.outage = None
            t0 = time.monotonic()
            await until(lambda: all(active_version(sim.devices[i]) == "3.0.0" for i in ids),
                        60, "devices updated to 3.0.0")
            took = time.monotonic() - t0
            assert not gw.retry_state and not h.down
            assert status_json(cfg_path)["sources"][0]["state"] == "ok"
        finally:
            stop.set()
            await asyncio.wait_for(daemon, 30)
            gw.close()
            await runner.cleanup()
            sock.close()
    logging.getLogger(__name__).info("back to updated in %.1fs after the outage", took)


async def test_a_device_that_really_fails_is_parked_and_shown(
        bench_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    srv = RdfmServer()
    ghost_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ghost_sock.bind(("127.0.0.1", 0))  # a UDP port that never answers
    ghost = {"id": "ghost", "hardware": "sim_board", "slot_size": 0x40000,
             "transport": {"kind": "udp", "host": "127.0.0.1", "port": ghost_sock.getsockname()[1]},
             "timeouts": {"request_s": 0.2, "connect_s": 0.5}}
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (real,) = sim.devices
        cfg = cfg_of(bench, sim, base, extra_devices=[ghost],
                     retry={"max_attempts": 2, "base_s": 0.05, "max_s": 0.1, "park_s": 3600})
        cfg_path = write_cfg(cfg, bench)
        gw = Gateway(cfg)
        stop = asyncio.Event()
        daemon = asyncio.create_task(gw.run_forever(stop))
        try:
            await until(lambda: any("parked after" in r.getMessage() for r in caplog.records),
                        60, "ghost parked")
            doc = status_json(cfg_path)  # another process, while the daemon runs
            parked = record(doc, "ghost").get("parked")
            assert parked is not None, record(doc, "ghost")
            assert parked["failures"] == 2 and parked["until"] > time.time() + 3000
            assert "SMPTimeout" in parked["reason"]
            assert record(doc, real)["parked"] is None
            assert doc["sources"][0]["state"] == "ok"
            assert "parked until" in status(cfg_path)
            rows = {r["device"]: r for r in gw.fleet.list_devices()}  # ctl list
            assert rows["ghost"]["parked"].startswith("parked until ")
            assert rows[real]["parked"] is None
            assert "parked=1" in gw.status_line()
        finally:
            stop.set()
            await asyncio.wait_for(daemon, 30)
            gw.close()
            ghost_sock.close()


# -- B: an unusable artifact with a matching checksum is refused once and blocked --------------
def _truncated_artifact(img: bytes) -> bytes:
    art = build_zephyr_artifact(img, device_types=["sim_board"], version="3.0.0")
    return art[: len(art) // 2]  # the server's sha256 is of these bytes


def _truncated_image(img: bytes) -> bytes:
    return build_zephyr_artifact(img[:-100], device_types=["sim_board"], version="3.0.0")


@pytest.mark.parametrize("cut", [_truncated_artifact, _truncated_image], ids=["artifact", "image"])
async def test_truncated_artifact_is_refused_once_and_blocked(
        bench_factory: Any, caplog: pytest.LogCaptureFixture,
        cut: Callable[[bytes], bytes]) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024, versions=VERSIONS)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev_id,) = sim.devices
        cfg = cfg_of(bench, sim, base)
        cfg_path = write_cfg(cfg, bench)
        await register(srv, cfg, [dev_id])
        srv.assign(dev_id, artifact(bench, "2.0.0"), "2.0.0", "sim_board")
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            assert res.outcomes[dev_id].status == Status.UPDATED  # 2.0.0 runs (journal target)
            pkg = srv.assign(dev_id, artifact(bench, "3.0.0", cut), "3.0.0", "sim_board")
            caplog.set_level(logging.INFO)
            for _ in range(4):  # several polls
                res = await gw.run_once()
                assert res.outcomes[dev_id].status == Status.REFUSED, res.outcomes[dev_id]
            rows = {r["device"]: r for r in gw.fleet.list_devices()}
        finally:
            gw.close()
        assert srv.files.gets(pkg.uuid) == 1  # downloaded once, never again
        refusals = [o for o in srv.outcomes(dev_id) if o["result"] != int(UpdateResult.SUCCESS)]
        assert len(refusals) == 1, refusals
        assert refusals[0]["artifact"] == f"rdfm-{pkg.sha256}"
        assert active_version(sim.devices[dev_id]) == "2.0.0"
        lines = [r.getMessage() for r in caplog.records if "not re-attempting" in r.getMessage()]
        assert len(lines) == 1, lines  # logged once, not at every poll
        assert "not re-attempting 2.0.0" not in lines[0]  # not the running version
        rec = record(status_json(cfg_path), dev_id)
        blocked = rec["blocked"]
        assert blocked is not None and blocked["artifact"] == f"rdfm-{pkg.sha256}"
        assert blocked["hash"][:16] in lines[0]
        if cut is _truncated_artifact:
            assert blocked["hash"] == pkg.sha256  # keyed by the artifact's bytes
        else:
            assert blocked["version"] == "3.0.0" and "3.0.0" in lines[0]
        assert rec["journal"]["step"] == "refused"
        assert rec["last_outcome"]["status"] == "refused"
        assert rows[dev_id]["blocked"] and rows[dev_id]["blocked"].startswith("blocked:")
        assert "blocked:" in status(cfg_path)


# -- C: status follows the current attempt -----------------------------------------------------
async def test_status_shows_the_current_attempt_not_the_previous_update(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024, versions=VERSIONS)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev_id,) = sim.devices
        cfg = cfg_of(bench, sim, base)
        cfg_path = write_cfg(cfg, bench)
        await register(srv, cfg, [dev_id])
        srv.assign(dev_id, artifact(bench, "2.0.0"), "2.0.0", "sim_board")
        gw = Gateway(cfg)
        try:
            assert (await gw.run_once()).outcomes[dev_id].status == Status.UPDATED
            pkg = srv.assign(dev_id, artifact(bench, "3.0.0"), "3.0.0", "sim_board")
            srv.files.fail[pkg.uuid] = [503]  # the download of 3.0.0 fails once
            out = (await gw.run_once()).outcomes[dev_id]
            assert out.status == Status.FAILED and "download" in out.detail
            rec = record(status_json(cfg_path), dev_id)
            assert rec["journal"]["artifact"] == f"rdfm-{pkg.sha256}"
            assert rec["journal"]["step"] == "failed"
            assert rec["last_outcome"]["status"] == "failed"
            assert "download" in rec["last_outcome"]["detail"]
            text = status(cfg_path)
            assert f"rdfm-{pkg.sha256}"[:20] in text and "done (updated)" not in text

            del srv.assigned[dev_id]  # the operator withdraws it: up to date, nothing failing
            assert (await gw.run_once()).outcomes[dev_id].status == Status.UP_TO_DATE
            rec = record(status_json(cfg_path), dev_id)
            assert rec["journal"]["last_error"] is None
            assert rec["last_outcome"]["status"] == "up-to-date"
            assert rec["last_outcome"]["detail"] is None

            srv.assigned[dev_id] = pkg  # offered again, the download works now
            assert (await gw.run_once()).outcomes[dev_id].status == Status.UPDATED
            rec = record(status_json(cfg_path), dev_id)
            assert rec["journal"]["target_version"] == "3.0.0"
            assert rec["journal"]["last_error"] is None
            assert rec["last_outcome"] == {**rec["last_outcome"], "status": "updated", "detail": None}
        finally:
            gw.close()


# -- D: a changed inventory reaches RDFM at the next check ------------------------------------
async def test_new_running_version_is_authenticated_at_the_next_check(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    srv = RdfmServer()  # tokens valid for 300 s: expiry never forces a new authentication here
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev_id,) = sim.devices
        cfg = cfg_of(bench, sim, base)
        await register(srv, cfg, [dev_id])
        srv.assign(dev_id, artifact(bench, "2.0.0"), "2.0.0", "sim_board")
        gw = Gateway(cfg)
        try:
            assert (await gw.run_once()).outcomes[dev_id].status == Status.UPDATED
            before = len(srv.auth_requests)
            assert srv.auth_requests[-1]["metadata"]["rdfm.software.version"] == "1.0.0"
            await gw.run_once()  # the next poll
            new = srv.auth_requests[before:]
            assert [a["metadata"]["rdfm.software.version"] for a in new] == ["2.0.0"], new
            assert new[0]["metadata"]["smp-gateway.slot0.version"] == "2.0.0"
            assert srv.checks[-1][0] == 204
            await gw.run_once()  # nothing changed: the token is used, no new authentication
            assert len(srv.auth_requests) == before + 1
        finally:
            gw.close()
