"""AWS IoT OTA for the MCUs behind the gateway, as FreeRTOS's OTA agent does it (``source.py``)."""

from gateway.sources.aws_ota.source import AwsOtaSource

__all__ = ["AwsOtaSource"]
