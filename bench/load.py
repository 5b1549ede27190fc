"""Many tasks with a real model's latency, from one client on one worker: what comes back, and how fast.

    python bench/load.py [--tasks 1000] [--concurrency 1000] [--latency 1000-3000] [--calibrate 5]
                         [--keel-env KEEL_X=VALUE ...] [--json]

N sample tickets of the support desk (agents/support_desk/data.py) as `support_desk` tasks on the generic
agent workflow (KeelAgent), on the `sim` model with `--latency` ms per model call (default 1000-3000, the
`--sim-latency` knob of `keel ticket batch`; spiral rate 15%), approval mode `escalate` (a write that
needs a person's approval goes to the human queue, the task ends). They are started and awaited by the
client code of `keel ticket batch` (starter.commands.run_batch: idempotent on the ticket id, at most
`--concurrency` tasks in flight), from this one process, on a local dev server with one Keel worker in a
process of its own (`python -m workers`, SQLite ledger and desk tables under a temp KEEL_HOME).

Figures:
- wall time (first start to the last task settled), tasks/s, task latency p50/p99 (the server's start
  and close times of each workflow), schedule-to-start p50/p99 of the activities and of the workflow tasks
  (from the histories: how long work waited for the worker);
- the ideal and the ratio to it. A task cannot end before its model calls have slept (the sim sleeps
  the drawn latency: the ledger's llm rows, clamped to the --latency range) plus the platform's own
  per-task time on an idle machine: `--calibrate` tasks are run alone first, one at a time, and the
  median of (wall - slept) is that overhead. The ideal wall time is the makespan of the N tasks, each
  (slept + overhead) long, started in order into `--concurrency` slots: what the run would take with
  no contention on this machine. ideal_ratio = wall / ideal;
- the CPU that explains a ratio above 1: the worker's, the server's, this client's (utime + stime, from
  /proc/<pid>/stat and os.times), in seconds and as a share of the machine's cores over the wall time,
  and the machine's busy share (other processes' included: the machine may be shared). cpu_floor_s is
  the run's own CPU over the cores: the least wall time this machine needs for the run with nothing else
  on it; cpu_floor_ratio = cpu_floor_s / ideal: how much of ideal_ratio the platform's own CPU explains
  (the rest is the share of the machine other processes took);
- peak RSS of the worker and the server (VmHWM of /proc/<pid>/status);
- lost and duplicated writes (both must be 0). lost: tasks that did not settle (an error, or no result)
  plus settled tasks whose ledger outcome row is missing plus write tools a result lists as executed
  whose row (a refund, a case) is missing. duplicated: rows counted twice for one task: ledger outcome
  rows of a workflow or of a ticket (by its key), human-queue rows of a workflow, refunds of one
  transaction in a workflow, cases of a workflow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

# `bench` is not an installed package: `python bench/load.py` finds it only from the root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from agents.support_desk.data import sample_tickets
from bench.throughput import (
    CLK_TCK,
    KEEL_READY_LINE,
    SEARCH_ATTRIBUTE_KEYS,
    BenchError,
    agent_inputs,
    child_env,
    find_server_pid,
    hard_exit,
    inherited_output_to,
    keel_settings,
    log,
    machine_info,
    percentile,
    proc_cpu_s,
    run_benchmark,
    system_busy_s,
    temporal_binary,
    worker_process,
)
from keel.codec import data_converter
from keel.commands import BatchItem
from keel.settings import KeelSettings
from keel.types import AgentInput, AgentResult
from starter.commands import run_batch

AGENT = "support_desk"
WRITE_TABLES = {"issue_refund": "support_desk_refunds", "escalate_to_human": "support_desk_cases"}
"""The desk's write tools and the table each writes one row to."""
TARGET_WORKER_RSS_MB = 1024.0
KEEL_WORKER_ENV: dict[str, str] = {}


# --- figures --------------------------------------------------------------------------------


def peak_rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def client_cpu_s() -> float:
    """This process's CPU (the client: its event loop and the SDK's Rust threads)."""
    t = os.times()
    return t.user + t.system


def ideal_makespan(durations: Sequence[float], concurrency: int) -> float:
    """Tasks started in order into `concurrency` slots, each as soon as a slot frees: the last end."""
    slots = [0.0] * min(max(1, concurrency), max(1, len(durations)))
    heapq.heapify(slots)
    end = 0.0
    for d in durations:
        start = heapq.heappop(slots)
        end = max(end, start + d)
        heapq.heappush(slots, start + d)
    return end


def pcts(values: Sequence[float], digits: int = 1) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), digits), "p99": round(percentile(values, 99), digits),
            "max": round(max(values), digits) if values else float("nan")}


def _secs(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


async def history_timings(client: Client, workflow_ids: Sequence[str], parallel: int = 20) -> dict[str, Any]:
    """From each workflow's history: its latency (start to close, the server's clock) and the
    schedule-to-start of its activities and workflow tasks."""
    sem = asyncio.Semaphore(parallel)
    task_s: list[float] = []
    act_sts: list[float] = []
    wft_sts: list[float] = []
    starts: list[datetime] = []
    closes: list[datetime] = []

    async def one(wid: str) -> None:
        async with sem:
            history = await client.get_workflow_handle(wid).fetch_history()
        scheduled: dict[int, datetime] = {}
        first = last = None
        for e in history.events:
            t = e.event_time.ToDatetime()
            first = first or t
            last = t
            if e.event_type in (EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
                                EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED):
                scheduled[e.event_id] = t
            elif e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                s = scheduled.get(e.activity_task_started_event_attributes.scheduled_event_id)
                if s is not None:
                    act_sts.append(_secs(s, t) * 1000)
            elif e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
                s = scheduled.get(e.workflow_task_started_event_attributes.scheduled_event_id)
                if s is not None:
                    wft_sts.append(_secs(s, t) * 1000)
        if first is not None and last is not None:
            task_s.append(_secs(first, last))
            starts.append(first)
            closes.append(last)

    await asyncio.gather(*(one(w) for w in workflow_ids))
    return {"task_s": task_s, "activity_sts_ms": act_sts, "workflow_task_sts_ms": wft_sts,
            "server_span_s": _secs(min(starts), max(closes)) if starts else float("nan")}


def books(db_url: str, workflow_ids: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """The rows the tasks left: per workflow, its ledger outcome rows, human-queue rows, refunds (by
    transaction) and cases; and outcome rows per ticket key (a ticket run under two workflow ids)."""
    ids = set(workflow_ids)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            def grouped(sql: str) -> dict[Any, int]:
                return {tuple(r[:-1]) if len(r) > 2 else r[0]: int(r[-1]) for r in conn.execute(text(sql))}

            outcome = grouped("SELECT workflow_id, COUNT(*) FROM ledger WHERE kind = 'outcome' GROUP BY workflow_id")
            by_key = grouped("SELECT task_key, COUNT(DISTINCT workflow_id) FROM ledger WHERE kind = 'outcome' "
                             "GROUP BY task_key")
            queue = grouped("SELECT workflow_id, COUNT(*) FROM human_queue GROUP BY workflow_id")
            refunds = grouped("SELECT workflow_id, transaction_id, COUNT(*) FROM support_desk_refunds "
                              "GROUP BY workflow_id, transaction_id")
            cases = grouped("SELECT workflow_id, COUNT(*) FROM support_desk_cases GROUP BY workflow_id")
    finally:
        engine.dispose()
    refunds_per_wf: dict[str, int] = {}
    for (wid, _tx), c in refunds.items():
        refunds_per_wf[wid] = refunds_per_wf.get(wid, 0) + c
    return {
        "outcome": {w: outcome.get(w, 0) for w in ids},
        "dup_outcome": sum(c - 1 for w, c in outcome.items() if w in ids and c > 1),
        "dup_key": sum(by_key.get(k, 0) - 1 for k in keys if by_key.get(k, 0) > 1),
        "dup_queue": sum(c - 1 for w, c in queue.items() if w in ids and c > 1),
        "dup_refund": sum(c - 1 for (w, _), c in refunds.items() if w in ids and c > 1),
        "dup_case": sum(c - 1 for w, c in cases.items() if w in ids and c > 1),
        "rows": {"support_desk_refunds": refunds_per_wf, "support_desk_cases": cases},
        "human_queue_rows": sum(c for w, c in queue.items() if w in ids),
        "refund_rows": sum(refunds_per_wf.get(w, 0) for w in ids),
        "case_rows": sum(c for w, c in cases.items() if w in ids),
    }


def slept_s(db_url: str, workflow_ids: Sequence[str], lo_ms: int, hi_ms: int) -> dict[str, float]:
    """Per workflow, the model latency its calls slept (ledger llm rows, each clamped to [lo, hi]:
    under load a row also holds the event loop's lag, which is not the model's)."""
    ids = set(workflow_ids)
    engine = create_engine(db_url)
    out = dict.fromkeys(ids, 0.0)
    try:
        with engine.connect() as conn:
            for wid, ms in conn.execute(text("SELECT workflow_id, latency_ms FROM ledger WHERE kind = 'llm'")):
                if wid in ids:
                    out[wid] += min(max(float(ms), lo_ms), hi_ms) / 1000
    finally:
        engine.dispose()
    return out


def lost_and_duplicated(items: Sequence[BatchItem], b: dict[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    not_settled = [i for i in items if i.error or (i.result is None and i.progress is None)]
    no_outcome = [i for i in items if i.result is not None and b["outcome"].get(i.workflow_id, 0) == 0]
    missing_writes = 0
    for i in items:
        if isinstance(i.result, AgentResult):
            for tool, table in WRITE_TABLES.items():
                want = i.result.tools_executed.count(tool)
                missing_writes += max(0, want - b["rows"][table].get(i.workflow_id, 0))
    lost = {"not_settled": len(not_settled), "no_outcome_row": len(no_outcome), "missing_write_rows": missing_writes}
    dup = {"outcome_rows": b["dup_outcome"], "ticket_under_two_ids": b["dup_key"], "human_queue_rows": b["dup_queue"],
           "refund_rows": b["dup_refund"], "case_rows": b["dup_case"]}
    return lost, dup


# --- the run --------------------------------------------------------------------------------


def parse_latency(spec: str) -> tuple[int, int]:
    low, _, high = spec.partition("-")
    lo, hi = int(low), int(high or low)
    if lo < 0 or hi < lo:
        raise ValueError(spec)
    return lo, hi


def load_inputs(settings: KeelSettings, n: int, seed: int, lo: int, hi: int, tag: str) -> list[AgentInput]:
    """The sample tickets as the desk's tasks (as `keel ticket batch --sample N --sim-latency lo-hi` makes
    them), their keys made unique to this run."""
    base = agent_inputs(AGENT, settings, sample_tickets(n, seed=seed))
    return [inp.model_copy(update={
        "key": f"{inp.key}-{tag}",
        "sim": inp.sim.model_copy(update={"latency_ms_min": lo, "latency_ms_max": hi}),
    }) for inp in base]


async def run(n: int, concurrency: int, lo: int, hi: int, calibrate: int) -> dict[str, Any]:
    temporal = temporal_binary()
    run_id = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="keel-load-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "keel-home"
        task_queue = f"bench-load-{run_id}"
        settings = keel_settings(task_queue, home)
        log(f"starting the dev server from {temporal} (its output: {tmp / 'server.log'})")
        with inherited_output_to(tmp / "server.log"):
            env = await WorkflowEnvironment.start_local(
                dev_server_existing_path=temporal, data_converter=data_converter(KeelSettings()),
                search_attributes=SEARCH_ATTRIBUTE_KEYS,
            )
        try:
            client = env.client
            address = client.service_client.config.target_host
            server_pid = find_server_pid(int(address.rsplit(":", 1)[1]))
            wenv = child_env(tmp, {"TEMPORAL_ADDRESS": address, "KEEL_TASK_QUEUE": task_queue,
                                   "KEEL_HOME": str(home), "KEEL_METRICS_PORT": "0", "KEEL_SDK_METRICS_PORT": "0",
                                   **KEEL_WORKER_ENV, "KEEL_AGENTS": f"agents.{AGENT}"})
            argv = [sys.executable, "-m", "workers"]
            async with worker_process("keel", argv, wenv, tmp / "keel-worker.log", client, task_queue,
                                      KEEL_READY_LINE) as w:
                # Calibration: a few tasks alone, one at a time (also the warm-up: imports, caches).
                cal = load_inputs(settings, calibrate, 1, lo, hi, f"cal-{run_id}")
                cal_items: list[BatchItem] = []
                cal_wall: list[float] = []
                for inp in cal:
                    t0 = time.perf_counter()
                    cal_items += await run_batch(client, settings, [inp], 1, idempotent=True)
                    cal_wall.append(time.perf_counter() - t0)
                bad = [i for i in cal_items if i.result is None]
                if bad:
                    raise BenchError(f"calibration task {bad[0].workflow_id} did not end: "
                                     f"{bad[0].error or bad[0].status}")
                cal_slept = await asyncio.to_thread(slept_s, settings.db_url, [i.workflow_id for i in cal_items],
                                                    lo, hi)
                overheads = [wall - cal_slept[i.workflow_id] for wall, i in zip(cal_wall, cal_items, strict=True)]
                overhead = percentile(overheads, 50)
                log(f"calibration: {calibrate} tasks alone, {percentile(cal_wall, 50):.2f}s median, platform "
                    f"overhead {overhead:.3f}s per task (median of wall - slept)")

                inputs = load_inputs(settings, n, 0, lo, hi, run_id)
                log(f"{n} tasks of {AGENT}, concurrency {concurrency}, model latency {lo}-{hi} ms, on {task_queue}")
                cpu0 = (proc_cpu_s(w.pid), proc_cpu_s(server_pid) if server_pid else float("nan"), client_cpu_s(),
                        system_busy_s())
                t0 = time.perf_counter()
                items = await run_batch(client, settings, inputs, concurrency, idempotent=True)
                wall = time.perf_counter() - t0
                cpu1 = (w.cpu_s(), proc_cpu_s(server_pid) if server_pid else float("nan"), client_cpu_s(),
                        system_busy_s())
                worker_rss, server_rss = w.peak_rss_mb(), peak_rss_mb(server_pid)
            log(f"{n} tasks settled in {wall:.1f}s; reading the histories and the database")
            ids = [i.workflow_id for i in items]
            timings = await history_timings(client, ids)
            slept = await asyncio.to_thread(slept_s, settings.db_url, ids, lo, hi)
            b = await asyncio.to_thread(books, settings.db_url, ids, [inp.key for inp in inputs])
        finally:
            await env.shutdown()

    lost, dup = lost_and_duplicated(items, b)
    ideal = ideal_makespan([slept[i] + overhead for i in ids], concurrency)
    cores = os.cpu_count() or 1
    worker_cpu, server_cpu, client_cpu, busy = (b1 - a1 for a1, b1 in zip(cpu0, cpu1, strict=True))
    statuses: dict[str, int] = {}
    for i in items:
        statuses[i.status] = statuses.get(i.status, 0) + 1
    results = [i.result for i in items if isinstance(i.result, AgentResult)]
    llm_calls = sum(r.llm_calls for r in results)
    errors = sorted({i.error for i in items if i.error})
    return {
        "tasks": n,
        "concurrency": concurrency,
        "latency_ms": [lo, hi],
        "completed": len(results),
        "statuses": dict(sorted(statuses.items())),
        "errors": errors[:5],
        "lost": sum(lost.values()),
        "lost_detail": lost,
        "duplicated": sum(dup.values()),
        "duplicated_detail": dup,
        "human_queue_rows": b["human_queue_rows"],
        "refund_rows": b["refund_rows"],
        "case_rows": b["case_rows"],
        "wall_s": round(wall, 2),
        "server_span_s": round(timings["server_span_s"], 2),
        "tasks_per_s": round(n / wall, 2),
        "llm_calls": llm_calls,
        "llm_calls_per_task": round(llm_calls / max(1, len(results)), 2),
        "task_latency_s": pcts(timings["task_s"], 2),
        "activity_schedule_to_start_ms": pcts(timings["activity_sts_ms"]),
        "workflow_task_schedule_to_start_ms": pcts(timings["workflow_task_sts_ms"]),
        "calibration": {"tasks": calibrate, "wall_s_median": round(percentile(cal_wall, 50), 3),
                        "overhead_s_median": round(overhead, 3)},
        "slept_s_per_task": pcts(list(slept.values()), 2),
        "ideal_s": round(ideal, 2),
        "ideal_ratio": round(wall / ideal, 3) if ideal else float("nan"),
        "cpu_s": {"worker": round(worker_cpu, 1), "server": round(server_cpu, 1), "client": round(client_cpu, 1),
                  "machine_busy": round(busy, 1)},
        "cpu_pct_of_machine": {k: round(100 * v / (wall * cores), 1) for k, v in (
            ("worker", worker_cpu), ("server", server_cpu), ("client", client_cpu), ("machine_busy", busy),
            ("others", busy - worker_cpu - server_cpu - client_cpu))},
        "cpu_floor_s": round((worker_cpu + server_cpu + client_cpu) / cores, 2),
        "cpu_floor_ratio": round((worker_cpu + server_cpu + client_cpu) / cores / ideal, 3) if ideal else float("nan"),
        "worker_cpu_ms_per_llm_call": round(1000 * worker_cpu / max(1, llm_calls), 2),
        "worker_peak_rss_mb": round(worker_rss, 1),
        "server_peak_rss_mb": round(server_rss, 1),
        "targets": {
            "no_error": {"target": "every task settled, no client error",
                         "met": not errors and lost["not_settled"] == 0},
            "lost_and_duplicated": {"target": "0 and 0", "met": sum(lost.values()) == 0 and sum(dup.values()) == 0},
            "worker_rss": {"target": f"<= {TARGET_WORKER_RSS_MB:.0f} MB", "met": worker_rss <= TARGET_WORKER_RSS_MB},
        },
        "keel_env": dict(KEEL_WORKER_ENV),
        "clk_tck": CLK_TCK,
        "machine": machine_info(temporal),
    }


def report(r: dict[str, Any]) -> str:
    m, t, c, cp = r["machine"], r["targets"], r["cpu_s"], r["cpu_pct_of_machine"]

    def met(k: str) -> str:
        return "met" if t[k]["met"] else "NOT met"

    def p(d: dict[str, float], unit: str) -> str:
        return f"p50 {d['p50']:g} {unit}, p99 {d['p99']:g} {unit}, max {d['max']:g} {unit}"

    return "\n".join([
        "Keel load benchmark: many tasks from one client on one worker",
        f"  command:   {m['command']}",
        f"  machine:   {m['cpu_model']}, {m['cores']} cores; {m['platform']}",
        f"  versions:  Python {m['python']}, temporalio {m['temporalio']}, {m['temporal_cli']}",
        f"  workload:  {r['tasks']} sample tickets as {AGENT} tasks (approval mode escalate), concurrency "
        f"{r['concurrency']}, sim model {r['latency_ms'][0]}-{r['latency_ms'][1]} ms per call, started and awaited "
        "by `keel ticket batch`'s client code (starter.commands.run_batch)"
        + (f"; worker env {' '.join(f'{k}={v}' for k, v in r['keel_env'].items())}" if r["keel_env"] else ""),
        f"  outcomes:  {r['statuses']}; {r['human_queue_rows']} human-queue rows, {r['refund_rows']} refunds, "
        f"{r['case_rows']} cases",
        *(f"  error:     {e}" for e in r["errors"]),
        "",
        f"  completed             {r['completed']} of {r['tasks']}",
        f"  lost                  {r['lost']}  {r['lost_detail']}",
        f"  duplicated            {r['duplicated']}  {r['duplicated_detail']}",
        f"  wall                  {r['wall_s']:.1f} s ({r['tasks_per_s']:.2f} tasks/s; server's first start to "
        f"last close {r['server_span_s']:.1f} s)",
        f"  ideal                 {r['ideal_s']:.1f} s: ratio {r['ideal_ratio']:.2f}x",
        f"    (each task: its model calls' sleep, {p(r['slept_s_per_task'], 's')}, + "
        f"{r['calibration']['overhead_s_median']:.3f} s"
        f" of platform time measured on {r['calibration']['tasks']} tasks alone; started in order into "
        f"{r['concurrency']} slots)",
        f"  model calls           {r['llm_calls']} ({r['llm_calls_per_task']:.2f} per task)",
        f"  task latency          {p(r['task_latency_s'], 's')}",
        f"  activity sched->start {p(r['activity_schedule_to_start_ms'], 'ms')}",
        f"  wf task sched->start  {p(r['workflow_task_schedule_to_start_ms'], 'ms')}",
        f"  CPU s (% of {m['cores']} cores over the wall time): worker {c['worker']:.1f} ({cp['worker']:.0f}%), "
        f"server {c['server']:.1f} ({cp['server']:.0f}%), client {c['client']:.1f} ({cp['client']:.0f}%), "
        f"others {cp['others']:.0f}%; machine busy {cp['machine_busy']:.0f}%",
        f"  CPU floor             {r['cpu_floor_s']:.1f} s: the run's own CPU (worker + server + client) over the "
        f"{m['cores']} cores, the least wall time this machine needs for it with nothing else running: "
        f"{r['cpu_floor_ratio']:.2f}x the ideal; the rest of the ratio is the machine's other load",

        f"  worker CPU per model call {r['worker_cpu_ms_per_llm_call']:.1f} ms",
        f"  peak RSS              worker {r['worker_peak_rss_mb']:.0f} MB, server {r['server_peak_rss_mb']:.0f} MB",
        "",
        f"  every task settled, no client error: {met('no_error')}",
        f"  lost 0 and duplicated 0:             {met('lost_and_duplicated')}",
        f"  worker peak RSS {t['worker_rss']['target']}:         {met('worker_rss')}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", "--tickets", dest="tasks", type=int, default=1000, help="tasks (default 1000)")
    parser.add_argument("--concurrency", type=int, default=1000, help="tasks in flight (default 1000)")
    parser.add_argument("--latency", default="1000-3000", metavar="MIN-MAX",
                        help="sim model latency per call, ms (default 1000-3000)")
    parser.add_argument("--calibrate", type=int, default=5, help="tasks run alone first to measure the platform's "
                                                                 "own time per task (default 5)")
    parser.add_argument("--keel-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the worker, e.g. KEEL_MAX_CONCURRENT_ACTIVITIES=500 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.concurrency < 1 or args.calibrate < 1:
        parser.error("--tasks, --concurrency and --calibrate must be at least 1")
    try:
        lo, hi = parse_latency(args.latency)
    except ValueError:
        parser.error(f"--latency {args.latency!r}: use milliseconds MIN-MAX with MIN <= MAX, e.g. 1000-3000")
    for kv in args.keel_env:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("KEEL_"):
            parser.error(f"--keel-env {kv!r}: use KEEL_NAME=value")
        KEEL_WORKER_ENV[key] = value
    return run_benchmark(lambda: run(args.tasks, args.concurrency, lo, hi, args.calibrate), args.json, report)


if __name__ == "__main__":
    hard_exit(main())
