"""Azure IoT Hub device-twin source (``source: {kind: azure_iot_hub}``): see ``source.py``."""

from gateway.sources.azure.source import AzureIotHubSource

__all__ = ["AzureIotHubSource"]
