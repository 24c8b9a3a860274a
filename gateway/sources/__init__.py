"""Update sources (fleet backends). ``build_source`` turns the config's ``source`` into one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gateway.config  # noqa: F401 - load the config schema first (it imports sources.settings)
from gateway.sources.base import FleetSource

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


def build_source(cfg: GatewayConfig) -> FleetSource:
    """The FleetSource for ``cfg.source`` (imports each backend only when it is used)."""
    src = cfg.source
    match src.kind:
        case "local":
            from gateway.sources.local import LocalSource

            return LocalSource(src)
        case "rdfm":
            from gateway.sources.rdfm import RdfmSource
            from gateway.sources.settings import RdfmSourceConfig

            assert isinstance(src, RdfmSourceConfig)
            return RdfmSource(src, cfg.state_dir)
        case "hawkbit":
            from gateway.sources.hawkbit import HawkbitSource
            from gateway.sources.settings import HawkbitSourceConfig

            assert isinstance(src, HawkbitSourceConfig)
            return HawkbitSource(src, cfg.state_dir, gateway_id=cfg.gateway_id)
        case "mqtt_jobs":
            from gateway.sources.mqtt_jobs import MqttJobsSource
            from gateway.sources.settings import MqttJobsSourceConfig

            assert isinstance(src, MqttJobsSourceConfig)
            return MqttJobsSource(src, cfg.state_dir, gateway_id=cfg.gateway_id,
                                  devices=[(d.id, d.group) for d in cfg.devices],
                                  roster_open=cfg.discovery is not None and bool(cfg.device_templates))
        case "aws_ota":
            from gateway.sources.aws_ota import AwsOtaSource
            from gateway.sources.settings import AwsOtaSourceConfig

            assert isinstance(src, AwsOtaSourceConfig)
            return AwsOtaSource(src, cfg.state_dir, gateway_id=cfg.gateway_id,
                                devices=[(d.id, d.group) for d in cfg.devices])
        case "latest_release":
            from gateway.sources.latest_release import LatestReleaseSource
            from gateway.sources.settings import LatestReleaseSourceConfig

            assert isinstance(src, LatestReleaseSourceConfig)
            return LatestReleaseSource(src, cfg.state_dir, gateway_id=cfg.gateway_id)
        case "lwm2m":
            from gateway.sources.lwm2m import Lwm2mSource
            from gateway.sources.settings import Lwm2mSourceConfig

            assert isinstance(src, Lwm2mSourceConfig)
            return Lwm2mSource(src, cfg.state_dir, gateway_id=cfg.gateway_id,
                               devices=[(d.id, d.group) for d in cfg.devices])
        case "azure_iot_hub":
            from gateway.sources.azure import AzureIotHubSource
            from gateway.sources.settings import AzureIotHubSourceConfig

            assert isinstance(src, AzureIotHubSourceConfig)
            return AzureIotHubSource(src, cfg.state_dir, gateway_id=cfg.gateway_id,
                                     devices=[(d.id, d.group) for d in cfg.devices],
                                     config_path=cfg.config_path)
    raise ValueError(f"unknown source kind {src.kind!r}")
