"""Bare Temporal baseline of bench/throughput.py: a workflow of K trivial activities in sequence.

No Keel logic: the default data converter, the default sandboxed workflow runner, default worker
limits, a small payload per step. `python -m bench.bare --address HOST:PORT --task-queue Q` runs its
worker until SIGINT/SIGTERM, in a process of its own so its CPU and memory can be measured alone.
The workflow lives in this module, never in `__main__`: the sandbox refuses `__main__` workflows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow

BARE_WORKFLOW = "BareWorkflow"
BARE_ACTIVITY = "bare_step"
READY_LINE = "bare worker on task queue"
PAYLOAD = "x" * 100
"""About the size of a small request; Keel's real payloads are larger, which is part of its cost."""


@dataclass
class BareInput:
    steps: int
    payload: str = PAYLOAD


@dataclass
class StepInput:
    step: int
    payload: str


@dataclass
class StepResult:
    step: int
    payload: str


@activity.defn(name=BARE_ACTIVITY)
async def bare_step(inp: StepInput) -> StepResult:
    return StepResult(step=inp.step, payload=inp.payload)


@workflow.defn(name=BARE_WORKFLOW)
class BareWorkflow:
    @workflow.run
    async def run(self, inp: BareInput) -> int:
        done = 0
        for i in range(inp.steps):
            res = await workflow.execute_activity(
                bare_step, StepInput(step=i, payload=inp.payload), start_to_close_timeout=timedelta(seconds=30)
            )
            done += res.step == i
        return done


async def main(argv: list[str] | None = None) -> None:
    """Run the bare worker until interrupted."""
    import argparse
    import logging
    import signal

    from temporalio.client import Client
    from temporalio.worker import Worker

    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--address", required=True, help="Temporal frontend, HOST:PORT")
    parser.add_argument("--task-queue", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = await Client.connect(args.address)
    worker = Worker(client, task_queue=args.task_queue, workflows=[BareWorkflow], activities=[bare_step])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.info("%s %r at %s", READY_LINE, args.task_queue, args.address)
    async with worker:
        await stop.wait()
    logging.info("bare worker stopped")


if __name__ == "__main__":
    # Run the module's own `main`, so the workflow class registered is bench.bare.BareWorkflow.
    from bench.bare import main as _main

    asyncio.run(_main())
