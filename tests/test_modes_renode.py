"""``renode/smp_gateway_modes.robot`` for real: one case per firmware folder of the shared Renode
firmware besides swap using scratch (swap using move, overwrite-only, direct-XIP with revert,
multi-image), with ``renode-test`` on the shared Renode, as ``tests/test_renode_suite.py`` runs
the main suite. Cheap checks of the suite's files run without Renode.

Results in ``build/renode-results/modes-<time>-<pid>/`` (Robot log, per case the gateway output,
console UART and state). ``SMPGW_RENODE_INCLUDE=<tag>`` runs one case (e.g. ``multi-image``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from gateway.config import parse_config

REPO = Path(__file__).resolve().parent.parent
RENODE = REPO / "renode"
SUITE = RENODE / "smp_gateway_modes.robot"
RESULTS_ROOT = REPO / "build" / "renode-results"
SUITE_TIMEOUT_S = 25 * 60
FOLDERS = {"swap-move": "stm32f4_disco-swap-move", "overwrite-only": "stm32f4_disco-overwrite-only",
           "direct-xip": "stm32f4_disco-direct-xip-revert", "multi-image": "stm32f4_disco-multi-image"}


# -- without Renode ---------------------------------------------------------------------------
def test_modes_suite_has_one_case_per_firmware_folder() -> None:
    from robot.api import TestSuite

    suite = TestSuite.from_file_system(str(SUITE))
    tags = [set(t.tags) for t in suite.tests]
    assert len(tags) == len(FOLDERS)
    for tag in FOLDERS:
        assert sum(tag in t for t in tags) == 1, (tag, tags)
    text = SUITE.read_text()
    for folder in FOLDERS.values():
        assert f"Firmware Dir    {folder}" in text, folder


@pytest.mark.parametrize("name", sorted(p.name for p in (RENODE / "modes").glob("*.yaml")))
def test_modes_configs_match_the_schema_and_the_firmware(tmp_path: Path, name: str) -> None:
    shutil.copy(RENODE / "modes" / name, tmp_path / "gateway.yaml")
    data = yaml.safe_load((tmp_path / "gateway.yaml").read_text())
    (tmp_path / "keys").mkdir()
    for k in data["trusted_keys"]:
        (tmp_path / k).write_text("placeholder\n")
    cfg = parse_config(data, tmp_path / "gateway.yaml")
    (dev,) = cfg.devices
    mode = name.removeprefix("gateway-").removesuffix(".yaml")
    folder = {"direct-xip-revert": "direct-xip"}.get(mode, mode)
    assert folder in FOLDERS
    assert dev.mcuboot_mode is not None  # these builds answer bootloader info ENOTSUP
    # the README's flash layout of each folder
    assert dev.slot_size == (128 if mode == "multi-image" else 256) * 1024
    if mode == "direct-xip-revert":
        assert dev.slot_offsets == [0x40000, 0x80000]
    assert dev.timeouts.reset_s >= 150
    assert f"modes/{name}" in SUITE.read_text()


def test_modes_keywords_library_loads() -> None:
    import importlib.util

    sys.path.insert(0, str(RENODE))
    try:
        spec = importlib.util.spec_from_file_location("modes_keywords", RENODE / "modes_keywords.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(RENODE))
    names = {getattr(f, "robot_name", None) for f in vars(mod).values()
             if callable(f) and getattr(f, "__module__", None) == mod.__name__} - {None}
    text = SUITE.read_text()
    for n in names:
        assert n in text, f"{n} is not used by the suite"
    assert mod.uploaded_images("device=disco step=upload image 1 (x): 10 bytes\n") == [
        "image 1 (x): 10 bytes"]
    assert re.search(r"Library\s+modes_keywords\.py", text)


# -- on Renode ----------------------------------------------------------------------------------
def _cases(output: Path) -> list[tuple[str, str, float, str]]:
    root = ET.parse(output).getroot()
    out = []
    for t in root.iter("test"):
        st = t.find("status")
        assert st is not None
        out.append((t.get("name", "?"), st.get("status", "?"), float(st.get("elapsed") or 0.0),
                    (st.text or "").strip()))
    return out


@pytest.mark.renode
@pytest.mark.timeout(SUITE_TIMEOUT_S + 120)
def test_modes_robot_suite_on_real_firmware(renode_runtime: Path) -> None:
    from gateway.renode import renode_test_binary

    results = RESULTS_ROOT / f"modes-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    tmp = results / "tmp"  # private TMPDIR: never the shared $TMPDIR/renode-*
    tmp.mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(tmp), RENODE_PYTHON=sys.executable,
               SMPGW_SHARED=str(renode_runtime))
    cmd = [str(renode_test_binary()), "-r", str(results)]
    if os.environ.get("SMPGW_RENODE_INCLUDE"):
        cmd += ["--include", os.environ["SMPGW_RENODE_INCLUDE"]]
    cmd.append(str(SUITE))
    t0 = time.monotonic()
    log = results / "renode-test.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=results, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=SUITE_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.monotonic() - t0
    output = results / "robot_output.xml"
    assert output.exists(), f"renode-test wrote no results (exit {proc.returncode}):\n" \
                            f"{log.read_text()[-4000:]}"
    cases = _cases(output)
    summary = "\n".join(f"  {st:4} {secs:6.1f}s  {name}" for name, st, secs, _ in cases)
    print(f"\nrenode/smp_gateway_modes.robot: {len(cases)} cases in {wall:.0f}s wall\n{summary}")
    failed = [(n, m) for n, st, _, m in cases if st != "PASS"]
    assert not failed and proc.returncode == 0, (
        f"renode-test exit {proc.returncode}; failed cases (logs in {results}/log.html and "
        f"{results}/work/<case>/gateway-N.log, console.log):\n"
        + "\n".join(f"- {n}: {m}" for n, m in failed) + f"\n{summary}")
    if not os.environ.get("SMPGW_RENODE_INCLUDE"):
        assert len(cases) == len(FOLDERS), summary
