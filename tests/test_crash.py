"""Crash recovery with real processes (#16 items 3-4): a Temporal dev server on its SQLite file and two workers
(`python -m workers`, as a deployment runs several), all subprocesses on free ports, run 16 support desk tickets
with 0.5-1.5 s model latency (so model calls are in flight); refunds are approved as soon as they are proposed,
so write tools run. Then:

- a worker is SIGKILLed while model calls are in flight (at least 3, seen on the server), and a replacement
  started (the tasks go on on the other worker meanwhile);
- every worker is SIGKILLed as soon as a refund row is seen committed (polled every 10 ms), and both restarted;
- the dev server is stopped (SIGTERM) and started again on the same file and port while calls are in flight.

Each time every task completes, each write happened once (one refund per executed issue_refund, each account's
balance credited once per refund, one human-queue item per task that went to a human) and the ledger equals
every task's result (its model calls' rows sum to the result's calls, tokens and cost). The heartbeat timeout
is 4 s here (KEEL_LLM_HEARTBEAT_TIMEOUT_S, pinned in each task's input), so the killed worker's model and tool
calls are retried within seconds; the retried call's ledger row replaces the first.

The database is the `crash_db_url` fixture's: SQLite by default; a PostgreSQL variant is one more entry in its
params naming a fixture that returns a PostgreSQL URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment

from activities.db import init_db, make_engine
from activities.ledger import Ledger
from activities.llm import LlmActivities
from activities.providers.base import ProviderResult
from agents.support_desk import store
from agents.support_desk.cli import APPROVER, ticket_input
from agents.support_desk.data import build_seed, sample_tickets
from keel import names
from keel.settings import KeelSettings
from keel.types import AgentInput, AgentResult, LlmRequest, Message, ModelSpec, SimConfig, TaskContext, Usage
from starter.agents import start_agent
from starter.approvals_cli import ApprovalError, decide, pending_action

TASKS = 16
"""Two of every kind of sample ticket: 4 refund requests (approved, so a refund is written), 2 fraud reports
(to a human at once: a human-queue item), the rest answered."""
LATENCY = SimConfig(latency_ms_min=500, latency_ms_max=1500, spiral_rate=0.0)
HEARTBEAT_TIMEOUT_S = 4.0
STARTED = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
WITHIN_S = 120.0
"""A wait condition's bound (far above what a scenario takes): a task stuck past it fails the test."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    return str(beside) if beside.is_file() else "temporal"


@pytest.fixture(params=["sqlite", "pg_url"])
def crash_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database of the ledger and the support desk's tables: SQLite, and PostgreSQL (tests/pg.py's
    throwaway server; skipped with the reason when its binaries or driver are missing)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keel.db'}"
    url: str = request.getfixturevalue(request.param)
    return url


class DevServer:
    """`temporal server start-dev` on its own SQLite file and free ports, as `keel up` starts it."""

    def __init__(self, home: Path) -> None:
        self.db_file = home / "temporal.db"
        self.log = home / "temporal.log"
        self.port, self.ui_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [temporal_binary(), "server", "start-dev", "--db-filename", str(self.db_file), "--ip", "127.0.0.1",
               "--port", str(self.port), "--ui-port", str(self.ui_port), "--headless", "--log-level", "warn"]
        for name, kind in names.SEARCH_ATTRIBUTES.items():
            cmd += ["--search-attribute", f"{name}={kind}"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"temporal server exited:\n{self.log.read_text()[-3000:]}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.3):
                return
            time.sleep(0.1)
        raise AssertionError(f"temporal server did not listen within 60 s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, as an operator restarts it; waits for the process to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class WorkerProcess:
    """`python -m workers` serving the support desk, as `keel up` starts it."""

    def __init__(self, home: Path, env: dict[str, str], name: str) -> None:
        self.home, self.env, self.name = home, env, name
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / f"worker-{name}.log"
        self.started = 0

    def spawn(self) -> None:
        self.started += 1
        self.log = self.home / f"worker-{self.name}-{self.started}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "workers"], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    async def ready(self) -> None:
        """Until it polls (its log says so)."""
        assert self.proc is not None
        deadline = time.monotonic() + WITHIN_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited:\n{self.log.read_text()[-3000:]}"
            if b"keel worker on task queue" in self.log.read_bytes():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"worker did not start within {WITHIN_S:.0f} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no completion reported for what it was running."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclasses.dataclass
class Stack:
    server: DevServer
    workers: list[WorkerProcess]
    client: Client
    engine: Engine
    settings: KeelSettings


@pytest.fixture
async def stack(tmp_path: Path, crash_db_url: str) -> AsyncIterator[Stack]:
    store.setup(store.engine_for(crash_db_url))  # the desk's tables and seed, before any worker (the test reads them)
    server = DevServer(tmp_path)
    server.start()
    queue = f"crash-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KEEL_HOME": str(tmp_path / ".keel"), "KEEL_AGENTS": "agents.support_desk",
           "KEEL_DATABASE_URL": crash_db_url, "TEMPORAL_ADDRESS": server.address, "KEEL_TASK_QUEUE": queue,
           "KEEL_METRICS_PORT": "0", "KEEL_SDK_METRICS_PORT": "0", "KEEL_TRACING": "off"}
    # Two workers, as a deployment runs them: a killed one's calls go on on the other while its replacement
    # starts (a worker takes seconds to start; on a loaded machine, tens of seconds).
    workers = [WorkerProcess(tmp_path, env, name) for name in ("a", "b")]
    try:
        for w in workers:
            w.spawn()
        for w in workers:
            await w.ready()
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        settings = KeelSettings(home=tmp_path / ".keel", task_queue=queue, temporal_address=server.address,
                                llm_heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        engine = make_engine(crash_db_url)
        yield Stack(server, workers, client, engine, settings)
        engine.dispose()
    finally:
        for w in workers:
            w.stop()
        server.stop()


def tickets(seed: int) -> list[AgentInput]:
    return [ticket_input(t.customer_id, t.text, f"{t.ticket_id}-{uuid.uuid4().hex[:6]}",
                         LATENCY.model_copy(update={"seed": seed}))
            for t in sample_tickets(TASKS, seed=seed)]


async def retrying(call: Callable[[], Awaitable[Any]], each_s: float = 10.0) -> Any:
    """A call to the server, tried again while the server (or the worker a query needs) is away."""
    deadline = time.monotonic() + WITHIN_S
    while True:
        try:
            return await asyncio.wait_for(call(), each_s)
        except (RPCError, TimeoutError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def approve_refunds(client: Client, handles: list[WorkflowHandle[Any, AgentResult]]) -> None:
    """A support lead who approves every proposed refund at once (so the refund, a write, runs), through the
    workflow's update; riding out a dead worker or server (queries and updates need them)."""
    decided: set[tuple[str, str]] = set()
    while True:
        for h in handles:
            with contextlib.suppress(RPCError, TimeoutError, RuntimeError, ApprovalError):
                action = await asyncio.wait_for(pending_action(client, h.id), 2)
                if action is not None and (h.id, action.action_id) not in decided:
                    await asyncio.wait_for(decide(client, h.id, APPROVER, "approve"), 5)
                    decided.add((h.id, action.action_id))
        await asyncio.sleep(0.1)


async def run_batch(stack: Stack, seed: int, crash: Callable[[list[WorkflowHandle[Any, AgentResult]]], Awaitable[None]]
                    ) -> tuple[list[AgentInput], list[AgentResult], float]:
    """Start the batch, crash something mid-run, wait for every task. Returns the inputs, results and seconds."""
    started = time.monotonic()
    inputs = tickets(seed)
    handles = [await start_agent(stack.client, stack.settings, inp, shadow=False) for inp in inputs]
    approver = asyncio.create_task(approve_refunds(stack.client, handles))
    try:
        await crash(handles)
        results = [await retrying(h.result) for h in handles]  # each: completed, however it ended
    finally:
        approver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await approver
    return inputs, results, time.monotonic() - started


def query(engine: Engine, sql: str, **params: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


async def wait_for(what: str, check: Callable[[], Awaitable[bool] | bool], poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + WITHIN_S
    while time.monotonic() < deadline:
        got = check()
        if await got if isinstance(got, Awaitable) else got:
            return
        await asyncio.sleep(poll_s)
    raise AssertionError(f"not within {WITHIN_S:.0f} s: {what}")


async def model_calls_in_flight(handles: list[WorkflowHandle[Any, AgentResult]]) -> int:
    descs = await asyncio.gather(*(h.describe() for h in handles), return_exceptions=True)
    return sum(1 for d in descs if not isinstance(d, BaseException)
               for a in d.raw_description.pending_activities
               if a.activity_type.name == names.LLM_ACTIVITY and a.state == STARTED)


def check_books(engine: Engine, inputs: list[AgentInput], results: list[AgentResult]) -> dict[str, int]:
    """Every task done, each write once, the ledger equal to every result. Returns what it counted."""
    assert len(results) == len(inputs)
    for inp, r in zip(inputs, results, strict=True):
        assert r.status in ("completed", "escalated"), (inp.key, r.status, r.reason)
        # The ledger equals the result: one row per model call, the retried calls' rows replaced.
        [llm] = query(engine, "SELECT count(*) AS calls, coalesce(sum(input_tokens), 0) AS tin, "
                              "coalesce(sum(output_tokens), 0) AS tout, coalesce(sum(cost_usd), 0) AS cost "
                              "FROM ledger WHERE workflow_id = :w AND kind = 'llm'", w=r.workflow_id)
        assert (llm["calls"], llm["tin"], llm["tout"]) == (r.llm_calls, r.input_tokens, r.output_tokens), \
            (r.workflow_id, llm)
        assert llm["cost"] == pytest.approx(r.cost_usd, abs=1e-8), (r.workflow_id, llm)
        [outcome] = query(engine, "SELECT status, input_tokens, output_tokens FROM ledger "
                                  "WHERE workflow_id = :w AND kind = 'outcome'", w=r.workflow_id)
        assert (outcome["input_tokens"], outcome["output_tokens"]) == (r.input_tokens, r.output_tokens)
        # Each write once: a refund per executed issue_refund, a human-queue item per task a human must see.
        refunds = query(engine, "SELECT idempotency_key FROM support_desk_refunds WHERE workflow_id = :w",
                        w=r.workflow_id)
        assert len(refunds) == r.tools_executed.count("issue_refund"), (r.workflow_id, refunds, r.tools_executed)
        queued = query(engine, "SELECT id FROM human_queue WHERE workflow_id = :w", w=r.workflow_id)
        assert len(queued) == (r.status != "completed"), (r.workflow_id, r.status, queued)
    # Each account credited once per refund: its balance is the seed's plus its refunds.
    seed = {a["id"]: a["balance"] for a in build_seed()["accounts"]}
    tx_account = {t["id"]: t["account_id"] for t in build_seed()["transactions"]}
    credited: dict[str, float] = {}
    for rf in query(engine, "SELECT transaction_id, amount FROM support_desk_refunds"):
        account = tx_account[rf["transaction_id"]]
        credited[account] = credited.get(account, 0.0) + rf["amount"]
    for a in query(engine, "SELECT id, balance FROM support_desk_accounts"):
        assert a["balance"] == pytest.approx(seed[a["id"]] + credited.get(a["id"], 0.0), abs=0.005), a
    refunds = len(query(engine, "SELECT id FROM support_desk_refunds"))
    assert refunds >= 1, "no refund was written: the batch exercised no write"
    retried = query(engine, "SELECT count(*) AS n FROM ledger WHERE kind = 'llm' AND attempt > 1")[0]["n"]
    return {"tasks": len(results), "refunds": refunds, "retried_llm_rows": retried,
            "human_queue": len(query(engine, "SELECT id FROM human_queue"))}


async def test_worker_sigkill_while_model_calls_are_in_flight(stack: Stack) -> None:
    async def crash(handles: list[WorkflowHandle[Any, AgentResult]]) -> None:
        await wait_for("3 model calls in flight", lambda: _at_least(model_calls_in_flight(handles), 3))
        stack.workers[0].kill()
        stack.workers[0].spawn()  # its replacement; the tasks do not wait for it

    inputs, results, took = await run_batch(stack, seed=1, crash=crash)
    counts = check_books(stack.engine, inputs, results)
    # The calls in flight when it died were retried (after the heartbeat timeout, not their whole limit),
    # each retry's ledger row replacing the first attempt's.
    assert counts["retried_llm_rows"] >= 1, counts
    print(f"worker SIGKILL mid-run: {counts}, {took:.1f} s")


async def test_worker_sigkill_right_after_a_write_committed(stack: Stack) -> None:
    async def crash(handles: list[WorkflowHandle[Any, AgentResult]]) -> None:
        await wait_for("a refund committed", lambda: bool(query(stack.engine, "SELECT id FROM support_desk_refunds")),
                       poll_s=0.01)
        for w in stack.workers:  # whichever ran the write: every worker dies, none reports what it was doing
            w.kill()
        for w in stack.workers:
            w.spawn()

    inputs, results, took = await run_batch(stack, seed=2, crash=crash)
    counts = check_books(stack.engine, inputs, results)
    print(f"worker SIGKILL after a write: {counts}, {took:.1f} s")


async def test_dev_server_restart_mid_run(stack: Stack) -> None:
    async def crash(handles: list[WorkflowHandle[Any, AgentResult]]) -> None:
        await wait_for("3 model calls in flight", lambda: _at_least(model_calls_in_flight(handles), 3))
        stack.server.stop()
        stack.server.start()  # the same file and port

    inputs, results, took = await run_batch(stack, seed=3, crash=crash)
    counts = check_books(stack.engine, inputs, results)
    print(f"dev server restart mid-run: {counts}, {took:.1f} s")


async def _at_least(n: Awaitable[int], k: int) -> bool:
    return await n >= k


# --- the retried call's ledger row (#16 item 3) ----------------------------------------------------------------


async def test_a_retried_model_call_rewrites_its_ledger_row(crash_db_url: str) -> None:
    """Attempt 2 of a model call (its first attempt's worker died after writing its row) leaves one row, the
    second attempt's: the ledger counts the call once, with what the workflow was answered."""
    engine = make_engine(crash_db_url)
    init_db(engine)

    class Fixed:
        name = "sim"

        def __init__(self, tokens: int) -> None:
            self.tokens = tokens

        async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
            return ProviderResult(text="done", usage=Usage(input_tokens=self.tokens, output_tokens=7),
                                  model="sim-large")

    wf = f"wf-{uuid.uuid4().hex[:8]}"
    req = LlmRequest(task=TaskContext(workflow_id=wf, tenant="C-1001"), step=3, kind="reason", prompt="support_desk",
                     agent="support_desk", model=ModelSpec(provider="sim", model="sim-large"),
                     messages=[Message(role="user", content="Customer: C-1001\n\nhello")])
    from agents.support_desk.agent import support_desk
    from keel import registry

    registry.register(support_desk)
    env = ActivityEnvironment()
    first = await env.run(LlmActivities({"sim": Fixed(100)}, Ledger(engine)).llm_call, req)
    env.info = dataclasses.replace(env.info, attempt=2, heartbeat_timeout=timedelta(seconds=HEARTBEAT_TIMEOUT_S))
    second = await env.run(LlmActivities({"sim": Fixed(250)}, Ledger(engine)).llm_call, req)
    rows = query(engine, "SELECT step, attempt, input_tokens, output_tokens, cost_usd FROM ledger "
                         "WHERE workflow_id = :w", w=wf)
    assert first.cost_usd != second.cost_usd
    assert rows == [{"step": 3, "attempt": 2, "input_tokens": 250, "output_tokens": 7,
                     "cost_usd": pytest.approx(second.cost_usd)}]
    engine.dispose()


# --- the heartbeat timeout, a setting (#16 item 3) ------------------------------------------------------------


async def test_the_heartbeat_timeout_is_pinned_in_the_task_and_scheduled_with_each_model_call(stack: Stack) -> None:
    """KEEL_LLM_HEARTBEAT_TIMEOUT_S (the starter's) is in the task's input and on every model and tool call's
    schedule; a task started without it (an older starter) keeps names.LLM_HEARTBEAT_TIMEOUT."""
    inp = ticket_input("C-1001", "What is my balance?", f"hb-{uuid.uuid4().hex[:6]}")
    pinned = await start_agent(stack.client, stack.settings, inp, shadow=False)
    bare = await stack.client.start_workflow(names.AGENT_WORKFLOW, inp.model_copy(update={"key": inp.key + "-bare"}),
                                             id=f"support_desk-{inp.key}-bare", task_queue=stack.settings.task_queue,
                                             result_type=AgentResult)
    for handle, expected in ((pinned, HEARTBEAT_TIMEOUT_S), (bare, names.LLM_HEARTBEAT_TIMEOUT.total_seconds())):
        await handle.result()
        scheduled = [e.activity_task_scheduled_event_attributes async for e in handle.fetch_history_events()
                     if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
        timeouts = {(a.activity_type.name == names.LLM_ACTIVITY, a.heartbeat_timeout.ToTimedelta().total_seconds())
                    for a in scheduled if a.activity_type.name != names.FINISH_ACTIVITY}
        # The model calls and the tool calls (get_account): both heartbeat, with the task's timeout.
        assert timeouts == {(True, expected), (False, expected)}


def test_a_bad_heartbeat_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_LLM_HEARTBEAT_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="llm_heartbeat_timeout_s"):
        KeelSettings()


@pytest.fixture(autouse=True)
def _fresh_store() -> Iterator[None]:
    store.reset()
    yield
    store.reset()

