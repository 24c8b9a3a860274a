"""Shared fixtures: imgtool-made keys/images and simulated devices on real sockets and PTYs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401  # imported at collection, not lazily by its plugin at exit
import pytest

from gateway.demo import Bench, make_bench


@pytest.fixture
def bench_factory(tmp_path: Path) -> Callable[..., Bench]:
    """``bench_factory(udp=1, serial=0, device_kw={...})`` -> a Bench in tmp_path."""
    count = [0]

    def make(**kw: Any) -> Bench:
        count[0] += 1
        return make_bench(tmp_path / f"bench{count[0]}", **kw)

    return make


# --- Renode: real firmware from the shared folder (gateway/renode.py) ----------------------------
@pytest.fixture(scope="session")
def renode_shared() -> Path:
    """The shared folder with ``renode/`` and ``firmware/`` ($SMPGW_SHARED or ../shared).

    Absent on a developer machine: skip, naming the path and the variable; in CI (``CI`` set)
    a failure, never a silent skip."""
    import os

    from gateway.renode import SHARED_ENV, shared_candidate, shared_dir

    path = shared_dir()
    if path is None:
        cand, why = shared_candidate()
        msg = (f"Renode tests need the shared folder (renode/ + firmware/): {cand / 'renode' / 'renode'} "
               f"not found ({why}); set {SHARED_ENV}=/path/to/shared")
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must provide it)")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def renode_runtime(renode_shared: Path) -> Path:
    """``renode_shared``, and Mono to run Renode (skip on a developer machine, fail in CI)."""
    import os
    import shutil

    if shutil.which("mono") is None:
        msg = "mono is not installed (Renode needs it): see ../shared/renode/README.md or .ci/run"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return renode_shared


@pytest.fixture(scope="session")
def stm32f4_disco(renode_shared: Path) -> Path:
    """Real MCUboot (swap using scratch) + Zephyr smp_svr for Renode's STM32F4-Discovery."""
    from gateway.renode import firmware_dir

    return firmware_dir("stm32f4_disco")


# --- reliability matrix: rows from tests/test_faults*.py -> docs/reliability.md ------------------
_RELIABILITY_ROWS: list[dict[str, Any]] = []
RELIABILITY_DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


@pytest.fixture(scope="session")
def reliability() -> list[dict[str, Any]]:
    """Fault tests append one row per case (see tests/test_faults.py ``Verdict``)."""
    return _RELIABILITY_ROWS


_MATRIX = {"collected": 0, "ran": 0}
_MATRIX_FILES = {"test_faults.py", "test_faults_kill.py"}
_matrix_files_seen: set[str] = set()


def _in_matrix(item: pytest.Item) -> bool:
    return "reliability" in getattr(item, "fixturenames", ())


# --- parallel runs (pytest-xdist, ``-n`` in pyproject's addopts) ------------------------------
# Each test file runs whole in one worker (module fixtures built once, a file's order kept), as
# ``--dist loadfile`` would; the files that together write docs/reliability.md at session end run
# in one worker, so that its sections are written by one process from complete figures.
_XDIST_GROUPS = {name: "reliability-doc"
                 for name in ("test_faults.py", "test_faults_kill.py", "test_fault_schedule.py")}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # before -k/-m deselection: how many matrix tests exist in the files collected
    _MATRIX["collected"] = sum(1 for i in items if _in_matrix(i))
    _matrix_files_seen.update(i.path.name for i in items if _in_matrix(i))
    for item in items:  # before xdist's own hook reads the groups (--dist loadgroup)
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_XDIST_GROUPS.get(item.path.name, item.path.name)))


def pytest_runtest_protocol(item: pytest.Item) -> None:
    if _in_matrix(item):
        _MATRIX["ran"] += 1


# --- randomized fault schedules (tests/test_fault_schedule.py) -> docs/reliability.md ----------
_FAULT_SCHEDULES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def fault_schedule_stats() -> dict[str, Any]:
    """tests/test_fault_schedule.py puts its figures here (count, faults fired, outcomes...)."""
    return _FAULT_SCHEDULES


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # the published matrix is the whole matrix: a partial run (-k, one file) leaves it alone
    whole = _MATRIX["ran"] == _MATRIX["collected"] and _MATRIX_FILES <= _matrix_files_seen
    if _RELIABILITY_ROWS and whole and exitstatus == 0:
        write_reliability_doc(_RELIABILITY_ROWS, RELIABILITY_DOC)
    # the schedules' section: only for the default set of seeds, and only when all passed
    fs = _FAULT_SCHEDULES
    if fs.get("default") and fs.get("failed") == 0 and fs.get("count"):
        write_fault_schedule_doc(fs, RELIABILITY_DOC)


# docs/reliability.md is made of sections, each rewritten by its own writer, the others kept
_SECTIONS = ("schedules", "matrix", "longruns", "powercuts")  # the last two: by hand, kept


def _doc_sections(path: Path) -> dict[str, str]:
    import re

    try:
        text = path.read_text()
    except OSError:
        return {}
    found = {m.group(1): m.group(2).strip("\n") for m in re.finditer(
        r"<!-- section:(\w+) -->\n(.*?)\n<!-- /section:\1 -->", text, re.S)}
    if not found and text.startswith("# Reliability matrix"):  # the single-section layout
        body = text.split("\n", 1)[1] if "\n" in text else ""
        found["matrix"] = "## Fault-injection matrix\n" + body.replace("\n## ", "\n### ")
    return found


def _write_doc(path: Path, **sections: str) -> None:
    have = {**_doc_sections(path), **sections}
    out = ["# Reliability", "",
           "Two kinds of evidence, both written by the test run (hook `pytest_sessionfinish` in "
           "`tests/conftest.py`, each section only after a complete, passing run of its tests); "
           "do not edit by hand.", ""]
    for name in _SECTIONS:
        if name in have:
            out += [f"<!-- section:{name} -->", have[name], f"<!-- /section:{name} -->", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


def write_fault_schedule_doc(stats: dict[str, Any], path: Path) -> None:
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fault_schedules

    fired = stats.get("fired", {})
    finals = stats.get("finals", {})
    lines = [
        "## Randomized fault schedules",
        "",
        f"Last run: {time.strftime('%Y-%m-%d %H:%M:%S')}: **{stats['count']} schedules** (seeds "
        f"{stats['first']}..{stats['first'] + stats['count'] - 1}), **{stats['failed']} broke an "
        f"invariant**, {stats['wall']:.0f} s wall with {stats['jobs']} schedules at a time "
        f"(`pytest tests/test_fault_schedule.py`; more: `python benchmarks/fault_schedules.py "
        "--count N`, one seed: `--seed S --count 1`).",
        "",
        "Each schedule is drawn from its seed: one device or a group of two (simulated Zephyr "
        "smp_svr + MCUboot over UDP, imgtool-signed images), faults at random requests (lost, "
        "answer lost, answer late or duplicated, device reset or power cut before or after the "
        "request is handled), at random moments (reset, power cut), in MCUboot's swap (power "
        "cut at a random sector), in the new image (its watchdog fires at a random time after "
        "each boot: before, during or after the health window and the confirm), in the gateway "
        "(a subprocess `smp-gateway run --once` SIGKILLed at a random request) and at the fleet "
        "server (final reports refused or taken without an answer, checks failing). The gateway "
        "then runs fault-free passes until every device settles, and the checker reads the "
        "devices and the server:",
        "",
    ]
    for name, text in fault_schedules.INVARIANTS:
        lines.append(f"- **{name}**: {text}.")
    actors = stats.get("actors") or []
    if actors:
        lines += ["", f"New actors in this set: {', '.join(actors)} - **operators** (cancel, "
                  "pause, resume, unblock, update, restart, maintenance windows opening and "
                  "closing, at random moments and right after a step), **hostile devices** (upload "
                  "answers without progress, ENOMEM forever, rewinds, state reads that contradict "
                  "the last one) and **hostile servers** (a dfu_application.zip that calls image 0 "
                  "a network core, lying versions/boards/load addresses, a zip bomb whose central "
                  "directory lies, a link outside the update directory, outages of 0.05-30 s). "
                  "Their invariants, checked on every schedule:", ""]
        for name, text in fault_schedules.NEW_INVARIANTS:
            lines.append(f"- **{name}**: {text}.")
    lines += ["", f"Schedules with a group: {stats.get('groups', 0)}; with the gateway as a "
              f"SIGKILLed subprocess: {stats.get('subprocess', 0)}.", "",
              "| fault injected | times |", "|---|---|"]
    for k, n in sorted(fired.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {k} | {n} |")
    lines += ["", "| devices' final outcome(s) | schedules |", "|---|---|"]
    for k, n in sorted(finals.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {k} | {n} |")
    _write_doc(path, schedules="\n".join(lines))


def write_reliability_doc(rows: list[dict[str, Any]], path: Path) -> None:
    import time

    rows = sorted(rows, key=lambda r: r["case"])
    unbootable = sum(1 for r in rows if not r["bootable"])
    unverified = sum(int(r["unverified_bytes"]) for r in rows)
    bad_reports = sum(1 for r in rows if not r["report_ok"])
    seconds = sum(float(r["seconds"]) for r in rows)
    lines = [
        "## Fault-injection matrix",
        "",
        "Written by the test run (`pytest tests/test_faults.py tests/test_faults_kill.py`).",
        f"Last run: {time.strftime('%Y-%m-%d %H:%M:%S')}, {len(rows)} cases, "
        f"{seconds:.0f} s of fault tests.",
        "",
        "Every case runs the real gateway (`Gateway.run_once`, or `smp-gateway run --once` as a "
        "subprocess for the SIGKILL cases) against the simulator (Zephyr smp_svr + MCUboot swap "
        "model) with the fault injected, then checks, *after a final power cycle of the device*:",
        "",
        "- **bootable**: the device boots and serves SMP on a *confirmed* image "
        "(the worst moment for a reset is any moment, so the check ends with one);",
        "- **confirmed**: the version it then runs (the target if the gateway reported success, "
        "the previous image otherwise);",
        "- **report ok**: every outcome the source was told matches what the device ended up "
        "running (no success for an image that is not confirmed on the device, no failure for one "
        "that is), and every attempt that got an offer was reported (nothing lost);",
        "- **unverified bytes**: bytes the device received for an upload whose SHA-256 is not "
        "that of an image the gateway verified (structure, hash, signature) first.",
        "",
        "### Totals",
        "",
        f"- cases: {len(rows)}",
        f"- devices left unbootable: **{unbootable}**",
        f"- unverified bytes uploaded: **{unverified}**",
        f"- lost or false reports: **{bad_reports}**",
        "",
        "### Cases",
        "",
        "| case | link | faults injected (as counted by the simulator) | gateway outcome(s) "
        "| bootable | confirmed image | report ok | unverified bytes | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['link']} | {r['faults']} | {r['outcomes']} | "
            f"{'yes' if r['bootable'] else '**NO**'} | {r['confirmed']} | "
            f"{'yes' if r['report_ok'] else '**NO**'} | {r['unverified_bytes']} | "
            f"{float(r['seconds']):.1f} |"
        )
    notes = [r for r in rows if r.get("note")]
    if notes:
        lines += ["", "### Notes", ""]
        lines += [f"- **{r['case']}**: {r['note']}" for r in notes]
    _write_doc(path, matrix="\n".join(lines))
