"""Waiting for many tasks at once: one loop over the server's visibility store instead of a loop per task.

`settle` (starter/commands.py) waits for one task: its result, and every quarter second a progress query
to see whether it waits for a person. For a batch of a thousand tasks that is four thousand queries a
second, each a workflow task the worker must run, on the client's one connection beside the thousand
result long-polls: the worker falls behind, the server holds the queries and the client's calls time
out. A `Settler` waits for every task of a batch with one listing of the server's visibility store per
round (`WorkflowId IN (...)`, at most `CHUNK` ids a call): a task found closed has its result read once,
a task found waiting for a person (its `KeelStatus` search attribute) has its progress queried once, at
most `parallel` such reads at a time. A task settles at most `poll_s` later than with a loop of its own.

For the generic agent workflow only (an AgentInput): it keeps `KeelStatus` up to date when it waits for
an approval. The patterns' tasks, and ids that cannot be quoted in a visibility query, are awaited as
before (`settle`), and so is every task when the server refuses the listing (no such search attribute).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from keel import names
from keel.commands import WAITING_FOR_PEOPLE, BatchItem, Startable
from keel.types import AgentInput, Progress

CHUNK = 100
"""Workflow ids per visibility listing."""
_QUOTABLE = re.compile(r"^[A-Za-z0-9_.:@/=+-]+$")


@dataclass
class _Waiting:
    handle: WorkflowHandle[Any, Any]
    done: asyncio.Future[tuple[Any, Progress | None]]
    """(the result, None) when the task ended; (None, its progress) when it waits for a person."""
    callers: int = 0
    """Batch items waiting for this workflow (an idempotent batch may name one key twice)."""


def _query(ids: list[str]) -> str:
    listed = ", ".join(f"'{i}'" for i in ids)
    waiting = ", ".join(f"'{s}'" for s in WAITING_FOR_PEOPLE)
    return (f"WorkflowId IN ({listed}) AND (ExecutionStatus != 'Running' OR {names.SA_STATUS} IN ({waiting}))")


class _Refused(Exception):
    """The server refused the shared listing: the task is awaited on its own."""


LIST_ATTEMPTS = 5
"""Consecutive failed listings (not a refusal) before the tasks still waiting fail with the error."""
READ_ATTEMPTS = 5
"""Failed RPCs reading one closed task's result before it fails with the error."""


class Settler:
    """`await settler.settle(client, handle, inp, existing)` for every task of a batch: the same BatchItem
    (or the same exception: a failed task raises) as `starter.commands.settle`, from one shared loop."""

    def __init__(self, poll_s: float = 1.0, parallel: int = 20) -> None:
        self.poll_s = poll_s
        self._waiting: dict[str, _Waiting] = {}
        self._loop: asyncio.Task[None] | None = None
        self._refused = False
        self._reads = asyncio.Semaphore(max(1, parallel))
        self._read_failures: dict[str, int] = {}

    async def settle(self, client: Client, handle: WorkflowHandle[Any, Any], inp: Startable,
                     existing: bool = False) -> BatchItem:
        from starter.commands import settle  # commands imports this module

        if self._refused or not isinstance(inp, AgentInput) or not _QUOTABLE.match(handle.id):
            return await settle(client, handle, inp, existing)
        w = self._waiting.get(handle.id)
        if w is None:
            w = self._waiting[handle.id] = _Waiting(handle, asyncio.get_running_loop().create_future())
        w.callers += 1
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run(client))
        try:
            result, progress = await asyncio.shield(w.done)
        except _Refused:
            return await settle(client, handle, inp, existing)
        finally:
            w.callers -= 1
            if not w.callers:
                self._waiting.pop(handle.id, None)
        return BatchItem(inp, handle.id, result=result, progress=progress, existing=existing)

    def _fail_all(self, e: BaseException) -> None:
        for w in self._waiting.values():
            if not w.done.done():
                w.done.set_exception(e)

    async def _run(self, client: Client) -> None:
        failures = 0
        while self._waiting:
            ids = list(self._waiting)
            try:
                found = []
                for start in range(0, len(ids), CHUNK):
                    found += [wf async for wf in client.list_workflows(_query(ids[start:start + CHUNK]))]
            except RPCError as e:
                if e.status == RPCStatusCode.INVALID_ARGUMENT:  # e.g. no KeelStatus search attribute
                    self._refused = True
                    self._fail_all(_Refused())
                    return
                failures += 1
                if failures >= LIST_ATTEMPTS:
                    self._fail_all(e)
                    return
                await asyncio.sleep(self.poll_s * 2 ** failures)
                continue
            failures = 0
            await asyncio.gather(*(self._read(wf.id, wf.status) for wf in found))
            await asyncio.sleep(self.poll_s)

    async def _read(self, wid: str, status: WorkflowExecutionStatus | None) -> None:
        w = self._waiting.get(wid)
        if w is None or w.done.done():
            return
        async with self._reads:
            try:
                if status != WorkflowExecutionStatus.RUNNING:
                    item: tuple[Any, Progress | None] = (await w.handle.result(), None)
                else:
                    try:
                        p = await w.handle.query(names.PROGRESS_QUERY, result_type=Progress)
                    except (RPCError, WorkflowQueryFailedError):
                        return  # not answering yet: the next round asks again
                    if p.status not in WAITING_FOR_PEOPLE:
                        return  # it went on meanwhile: the next round sees it again
                    item = (None, p)
            except RPCError as e:  # reading a closed task's result: again next round, a few times
                self._read_failures[wid] = self._read_failures.get(wid, 0) + 1
                if self._read_failures[wid] >= READ_ATTEMPTS and not w.done.done():
                    w.done.set_exception(e)
                return
            except Exception as e:  # a failed task: as with settle, it raises in the caller
                if not w.done.done():
                    w.done.set_exception(e)
                return
        if not w.done.done():
            w.done.set_result(item)
