"""One way to connect to Temporal, for the CLI and the worker."""

from __future__ import annotations

from temporalio.client import Client

from core.codec import data_converter
from core.settings import KeelSettings


async def connect(settings: KeelSettings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        api_key=settings.temporal_api_key,
        tls=settings.temporal_tls or bool(settings.temporal_api_key),
        data_converter=data_converter(settings),
    )
