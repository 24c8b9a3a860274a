"""The Robot suite ``renode/smp_gateway.robot`` for real: ``renode-test`` on the shared Renode
with the real MCUboot + Zephyr smp_svr firmware (``../shared`` or ``$SMPGW_SHARED``).

Runs as part of README's test command so CI covers it. Results (Robot log/report, and per test
the gateway's output, the console UART and the gateway state) stay in
``build/renode-results/<time>-<pid>/`` (``build/renode-results/latest`` points at the newest;
one folder per run, as several checkouts' test runs may share a working tree); a failure here
names each failed case with Robot's message.
Environment: ``SMPGW_RENODE_INCLUDE=tag`` runs only the cases with that tag,
``SMPGW_RENODE_VARIABLES="UPLOAD_EVERY_CASE:True"`` passes Robot variables (space-separated).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gateway.renode import renode_test_binary

pytestmark = pytest.mark.renode

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "renode" / "smp_gateway.robot"
RESULTS_ROOT = REPO / "build" / "renode-results"
SUITE_TIMEOUT_S = 30 * 60  # the suite takes 5-15 min on 2 cores; CI's budget is 45 min in all


def _cases(output: Path) -> list[tuple[str, str, float, str]]:
    """(name, status, seconds, message) of every test in renode-test's robot_output.xml."""
    root = ET.parse(output).getroot()
    out = []
    for t in root.iter("test"):
        st = t.find("status")
        assert st is not None
        secs = float(st.get("elapsed") or 0.0)
        out.append((t.get("name", "?"), st.get("status", "?"), secs, (st.text or "").strip()))
    return out


@pytest.mark.timeout(SUITE_TIMEOUT_S + 120)
def test_robot_suite_on_real_firmware(renode_runtime: Path) -> None:
    results = RESULTS_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tmp = results / "tmp"  # private TMPDIR: never the shared $TMPDIR/renode-*
    tmp.mkdir(parents=True)
    latest = RESULTS_ROOT / "latest"
    link = RESULTS_ROOT / f".latest-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(results.name)
    os.replace(link, latest)
    env = dict(os.environ, TMPDIR=str(tmp), RENODE_PYTHON=sys.executable,
               SMPGW_SHARED=str(renode_runtime))
    cmd = [str(renode_test_binary()), "-r", str(results)]
    if os.environ.get("SMPGW_RENODE_INCLUDE"):
        cmd += ["--include", os.environ["SMPGW_RENODE_INCLUDE"]]
    for var in os.environ.get("SMPGW_RENODE_VARIABLES", "").split():
        cmd += ["--variable", var]
    cmd.append(str(SUITE))
    t0 = time.monotonic()
    log = results / "renode-test.txt"
    with open(log, "w") as out:
        # own process group: on a timeout or an interrupted test run, renode-test, its Python
        # runner, Renode and any gateway still running go down together (and only they)
        proc = subprocess.Popen(cmd, cwd=results, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=SUITE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - t0
    text = log.read_text()
    output = results / "robot_output.xml"
    assert output.exists(), f"renode-test wrote no results (exit {proc.returncode}):\n" \
                            f"{text[-4000:]}"
    cases = _cases(output)
    summary = "\n".join(f"  {st:4} {secs:6.1f}s  {name}" for name, st, secs, _ in cases)
    print(f"\nrenode/smp_gateway.robot: {len(cases)} cases in {wall:.0f}s wall\n{summary}")
    failed = [(n, m) for n, st, _, m in cases if st != "PASS"]
    assert not failed and proc.returncode == 0, (
        f"renode-test exit {proc.returncode}; failed cases (logs in {results}/log.html and "
        f"{results}/work/<case>/gateway-N.log, console.log):\n"
        + "\n".join(f"- {n}: {m}" for n, m in failed) + f"\n{summary}")
    if not os.environ.get("SMPGW_RENODE_INCLUDE"):
        assert len(cases) == 6, summary
