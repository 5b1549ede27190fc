"""`python -m workers`: run a Keel worker until interrupted."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from activities.alerts import TaskObserver
from activities.breaker import UsageReporter
from activities.db import init_db, make_engine
from activities.metrics import KeelMetrics, sdk_runtime, serve_metrics
from activities.tracing import Tracing
from activities.tracing import shutdown as shutdown_tracing
from keel.settings import KeelSettings
from starter.client import connect
from starter.console import settings_problems
from workers.worker import build_worker, tune_gc


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = KeelSettings()
    except ValueError as e:  # a bad setting (KEEL_PRICES, KEEL_MODEL_*...): said plainly, no traceback
        logging.error("invalid settings: %s", settings_problems(e))
        raise SystemExit(2) from None
    # Temporal's SDK metrics on KEEL_SDK_METRICS_PORT (the client's runtime), Keel's on KEEL_METRICS_PORT.
    client = await connect(settings, runtime=sdk_runtime(settings))
    reporter = UsageReporter(client, settings.breaker_report_flush_s)
    engine = make_engine(settings.db_url)
    init_db(engine)
    metrics = KeelMetrics.shared()
    serve_metrics(settings, metrics)
    observer = TaskObserver.from_settings(engine, settings, metrics)
    worker = build_worker(client, settings, engine=engine, reporter=reporter, tracing=Tracing.from_settings(settings),
                          observer=observer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tune_gc(settings)
    logging.info("keel worker on task queue %r at %s", settings.task_queue, settings.temporal_address)
    if settings.rate_limits:
        logging.info("provider rate limits, shared by the workers of this task queue: %s", settings.rate_limit_table)
    async with worker:
        await stop.wait()
    await reporter.aclose()
    await asyncio.to_thread(observer.close, 5.0)  # alerts of the last tasks, and their webhooks
    shutdown_tracing()
    logging.info("keel worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
    # See starter.cli.main: skip a teardown that the Temporal client's threads can abort.
    logging.shutdown()
    os._exit(0)
