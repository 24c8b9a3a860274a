"""Configuration errors name the file, the key path and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent


def _base(tmp_path: Path) -> dict:
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n")
    return {
        "state_dir": str(tmp_path / "state"),
        "trusted_keys": [str(key)],
        "source": {"kind": "local", "path": str(tmp_path)},
        "devices": [
            {"id": "a", "hardware": "hw", "transport": {"kind": "udp", "host": "127.0.0.1"}},
            {"id": "b", "hardware": "hw", "transport": {"kind": "serial", "port": "/dev/ttyACM0"}},
        ],
    }


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "gw.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _err(tmp_path: Path, data: object) -> ConfigError:
    p = _write(tmp_path, data)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.path == str(p)
    return ei.value


def test_valid_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _base(tmp_path)))
    assert cfg.devices[0].transport.port == 1337  # type: ignore[union-attr]
    assert cfg.devices[1].confirm == "gateway"
    assert cfg.devices[1].transport.baud == 115200  # type: ignore[union-attr]


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["devices"][1]["transport"]["buad"] = 9600
    e = _err(tmp_path, d)
    assert e.key == "devices[1].transport.buad"
    assert "unknown key" in e.message


def test_wrong_type_names_key_and_expectation(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["devices"][0]["transport"]["port"] = "x"
    e = _err(tmp_path, d)
    assert e.key == "devices[0].transport.port"
    assert "integer" in e.message and "'x'" in e.message


def test_bad_enum_value(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["devices"][0]["confirm"] = "sometimes"
    e = _err(tmp_path, d)
    assert e.key == "devices[0].confirm"
    assert "'gateway'" in e.message and "'app'" in e.message


def test_missing_required_key(tmp_path: Path) -> None:
    d = _base(tmp_path)
    del d["devices"][0]["hardware"]
    e = _err(tmp_path, d)
    assert e.key == "devices[0].hardware" and "missing" in e.message


def test_unknown_transport_kind(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["devices"][0]["transport"] = {"kind": "carrier-pigeon"}
    e = _err(tmp_path, d)
    assert e.key == "devices[0].transport"
    assert "udp" in e.message and "serial" in e.message


def test_duplicate_device_ids(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["devices"][1]["id"] = "a"
    e = _err(tmp_path, d)
    assert e.key == "devices" and "twice" in e.message


def test_missing_key_file(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["trusted_keys"] = [str(tmp_path / "nope.pem")]
    e = _err(tmp_path, d)
    assert e.key == "trusted_keys[0]" and "nope.pem" in e.message


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text("devices: [\n  - id: a\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "line" in ei.value.message


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["state_dir"] = "state"
    d["trusted_keys"] = ["k.pem"]
    cfg = load_config(_write(tmp_path, d))
    assert cfg.state_dir == (tmp_path / "state").resolve()


def test_secret_from_env_never_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config import SecretRef

    monkeypatch.setenv("GW_TOKEN", "hunter2")
    s = SecretRef(env="GW_TOKEN")
    assert s.get() == "hunter2"
    inline = SecretRef.model_validate({"value": "hunter2"})
    assert "hunter2" not in repr(inline) and "hunter2" not in str(inline.model_dump())


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(["a"], tmp_path / "x.yaml")
    assert "mapping" in ei.value.message


def test_cli_exit_code_2_and_one_line_error(tmp_path: Path) -> None:
    d = _base(tmp_path)
    d["max_concurrent"] = 0
    p = _write(tmp_path, d)
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--once", "--config", str(p)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert str(p) in lines[0] and "max_concurrent" in lines[0] and "greater than or equal to 1" in lines[0]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                        if p.name != "sim.yaml"))
def test_example_configs_validate(name: str, tmp_path: Path) -> None:
    """Every example in configs/ is valid against the schema (key files aside)."""
    data = yaml.safe_load((REPO / "configs" / name).read_text())
    key = tmp_path / "k.pem"
    key.write_text("x")
    data["trusted_keys"] = [str(key)]
    cfg = parse_config(data, REPO / "configs" / name)
    assert cfg.devices or (cfg.device_templates and cfg.discovery)


def test_example_sim_config_validates() -> None:
    from gateway.sim.config import load_sim_config

    cfg = load_sim_config(REPO / "configs" / "sim.yaml")
    assert [d.id for d in cfg.devices] == ["udp-1", "serial-1"]
