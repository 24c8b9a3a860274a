"""The copy-paste examples in configs/ validate; secrets never show in reprs or logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigError, parse_config
from gateway.sources import build_source

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["rdfm", "hawkbit", "mqtt-jobs", "latest-release", "lwm2m",
                                  "aws-ota", "azure"])
def test_example_configs_validate(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    key = tmp_path / "k.pem"
    key.write_text("x")
    data["trusted_keys"] = [str(key)]
    data["state_dir"] = str(tmp_path / "state")
    monkeypatch.setenv("MEMFAULT_PROJECT_KEY", "k")
    for k in ("ca_file", "cert_file", "key_file"):  # the examples point at /etc files
        data["source"].pop(k, None)
    cfg = parse_config(data, tmp_path / f"{name}.yaml")
    assert cfg.source.kind == {"azure": "azure_iot_hub"}.get(name, name.replace("-", "_"))
    assert build_source(cfg).name == cfg.source.kind


def test_unknown_source_key_rejected(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    with pytest.raises(ConfigError, match=r"source\.tokn"):
        parse_config(
            {
                "state_dir": str(tmp_path),
                "trusted_keys": [str(key)],
                "source": {"kind": "hawkbit", "url": "https://h", "gateway_token": "t", "tokn": 1},
                "devices": [{"id": "a", "hardware": "b", "transport": {"kind": "udp", "host": "h"}}],
            },
            tmp_path / "c.yaml",
        )


def test_secrets_not_in_repr(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    caplog.set_level(logging.DEBUG)
    cfg = parse_config(
        {
            "state_dir": str(tmp_path),
            "trusted_keys": [str(key)],
            "source": {"kind": "latest_release", "url": "https://r", "project_key": "very-secret-key"},
            "devices": [{"id": "a", "hardware": "b", "transport": {"kind": "udp", "host": "h"}}],
        },
        tmp_path / "c.yaml",
    )
    logging.getLogger("test").info("config: %r / %s", cfg, cfg)
    assert "very-secret-key" not in caplog.text
