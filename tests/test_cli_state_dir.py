"""One writer per state directory, and a state directory that cannot be used: the installed CLI
as an operator runs it - one line on stderr, exit 2, no traceback (gateway/statelock.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gateway import devkit

pytestmark = pytest.mark.timeout(90)

CLI = [sys.executable, "-m", "gateway.cli"]


def write_config(tmp: Path, state_dir: Path) -> Path:
    key = devkit.make_key(tmp / "key.pem")
    fw = tmp / "fw"
    fw.mkdir(exist_ok=True)
    (fw / "manifest.yaml").write_text("images: []\n")
    cfg = {
        "state_dir": str(state_dir),
        "trusted_keys": [str(key)],
        "source": {"kind": "local", "path": str(fw), "poll_interval_s": 0.5},
        "devices": [{"id": "d1", "hardware": "hw", "slot_size": 0x8000,
                     "transport": {"kind": "udp", "host": "127.0.0.1", "port": 9}}],
    }
    path = tmp / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_second_gateway_on_one_state_dir_is_refused(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, tmp_path / "state")
    first = subprocess.Popen([*CLI, "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        lock = tmp_path / "state" / "gateway.lock"
        deadline = time.monotonic() + 30
        # the daemon writes its PID into the lock file once it holds the lock
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the daemon never took the state_dir lock"
            time.sleep(0.05)
        for args in (["run", "-c", str(cfg), "--once"], ["run", "-c", str(cfg)]):
            r = run_cli(*args)
            assert r.returncode == 2, (args, r.returncode, r.stderr)
            line = one_line_error(r)
            assert f"in use by PID {first.pid}" in line, line
            assert "state_dir" in line and str(cfg) in line, line
        assert first.poll() is None, "the first gateway must keep running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=40)
    # the lock goes with its holder: the next gateway starts
    r = run_cli("run", "-c", str(cfg), "--once")
    assert "in use by" not in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["file", "unwritable", "proc"])
def test_unusable_state_dir_is_one_line_exit_2(tmp_path: Path, kind: str) -> None:
    if kind == "file":
        state = tmp_path / "afile"
        state.write_text("x")
    elif kind == "unwritable":
        if os.geteuid() == 0:
            state = Path("/proc/version/state")  # root writes anywhere else
        else:
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o500)
            state = ro / "state"
    else:
        state = Path("/proc/smp-gateway-state")
    cfg = write_config(tmp_path, state)
    r = run_cli("run", "-c", str(cfg), "--once")
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = one_line_error(r)
    assert "state_dir" in line and str(state) in line, line


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("smp-gateway "), r.stdout
