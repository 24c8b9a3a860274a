"""``smp-gateway status``: the blocked image is named (not "(blocked)" beside whatever the
target is now), and ``--json`` prints the inventory records the fleet servers get."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from gateway.journal import Entry, Journal


def test_status_names_the_blocked_image(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    state = tmp_path / "state"
    cfg = {"state_dir": str(state), "trusted_keys": [str(key)],
           "source": {"kind": "local", "path": str(tmp_path)},
           "devices": [{"id": "dev-1", "hardware": "b", "transport": {"kind": "udp", "host": "127.0.0.1"}}]}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(cfg))
    j = Journal(state / "journal.sqlite")
    # 3.0.0 rolled back and is blocked; then 4.0.0 went in fine
    j.put(Entry("dev-1", step="done", target_hash="44" * 32, target_version="4.0.0",
                outcome="updated", running_version="4.0.0", running_hash="44" * 32,
                blocked_hash="33" * 32, blocked_artifact="release-3.0.0"))
    j.close()
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "-c", str(path), "--offline"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "4.0.0 4444444444" in out.stdout
    assert "blocked: release-3.0.0 333333333333" in out.stdout
    assert "4.0.0 444444444444 (blocked)" not in out.stdout
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "-c", str(path), "--offline",
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (rec,) = json.loads(out.stdout)["devices"]
    assert rec["device"] == "dev-1" and rec["transport"] == "udp"
    assert rec["address"] == "127.0.0.1:1337"
    assert rec["blocked"] == {"version": None, "hash": "33" * 32, "artifact": "release-3.0.0"}
    assert rec["journal"]["target_version"] == "4.0.0"
    assert rec["last_outcome"]["status"] == "updated"
