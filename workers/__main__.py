"""`python -m workers`: run a Keel worker until interrupted."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from activities.breaker import UsageReporter
from activities.tracing import Tracing
from activities.tracing import shutdown as shutdown_tracing
from core.settings import KeelSettings
from starter.client import connect
from workers.worker import build_worker


async def main() -> None:
    settings = KeelSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = await connect(settings)
    reporter = UsageReporter(client, settings.breaker_report_flush_s)
    worker = build_worker(client, settings, reporter=reporter, tracing=Tracing.from_settings(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.info("keel worker on task queue %r at %s", settings.task_queue, settings.temporal_address)
    async with worker:
        await stop.wait()
    await reporter.aclose()
    shutdown_tracing()
    logging.info("keel worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
    # See starter.cli.main: skip a teardown that the Temporal client's threads can abort.
    logging.shutdown()
    os._exit(0)
