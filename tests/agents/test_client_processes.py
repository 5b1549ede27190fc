"""`keel ticket batch` as an operator runs it, in real processes (issue 16 items 1-2): a Temporal dev server
of the test's own on its SQLite file (free ports), a worker serving the support desk, and the `keel` client
as a subprocess.

- Killed mid-batch (SIGKILL) and run again, the batch answers every customer exactly once: one workflow run
  per ticket, one outcome row, at most one refund and one human-queue row or case each; the second run
  finds the first one's tasks by their ids.
- Interrupted (SIGTERM, Ctrl-C), it prints what finished and what is pending, and exits 143 / 130.
- The server restarted under a running batch: the batch waits for it, says so, finishes without error and
  prints every ticket's result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from agents.support_desk import store, support_desk
from keel import names
from keel.testing import AgentEnvironment, _binary, agent_environment
from tests.agents.conftest import rows

ROOT = Path(__file__).resolve().parents[2]
KEEL = [sys.executable, "-m", "starter"]
N = 10
WAIT_S = 240
"""The longest any step here is waited for (a bound against a hang, not a timing goal)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DevServer:
    """`temporal server start-dev` on a SQLite file, with Keel's search attributes, stoppable and restartable."""

    def __init__(self, home: Path) -> None:
        self.home, self.port, self.ui_port = home, free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        cmd = [_binary("temporal"), "server", "start-dev", "--db-filename", str(self.home / "temporal.db"),
               "--ip", "127.0.0.1", "--port", str(self.port), "--ui-port", str(self.ui_port), "--log-level", "error"]
        for name, kind in names.SEARCH_ATTRIBUTES.items():
            cmd += ["--search-attribute", f"{name}={kind}"]
        self.proc = spawn(cmd, self.home / "temporal.log")
        await until(self.answers, "the dev server answers")

    async def answers(self) -> bool:
        try:
            c = await Client.connect(self.address)
            await c.count_workflows()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


async def until(check: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {WAIT_S} s: {what}")


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[DevServer, AgentEnvironment]]:
    (tmp_path / "server").mkdir()
    server = DevServer(tmp_path / "server")
    await server.start()
    try:
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        async with agent_environment(support_desk, client=client, db_url=db_url) as env:
            yield server, env
    finally:
        server.stop()


def cli_env(server: DevServer, env: AgentEnvironment, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TEMPORAL_ADDRESS": server.address, "KEEL_TASK_QUEUE": env.settings.task_queue,
            "KEEL_HOME": str(tmp_path / "home"), "KEEL_DATABASE_URL": str(env.engine.url), "COLUMNS": "200",
            "PYTHONPATH": str(ROOT)}


def batch(cli: dict[str, str], seed: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*KEEL, "ticket", "batch", "--sample", str(N), "--sim-seed", str(seed),
                             "--spiral-rate", "0", "--sim-latency", "200-600", "-k", "3", *extra],
                            env=cli, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcomes(env: AgentEnvironment) -> list[dict[str, Any]]:
    return rows(env.engine, "SELECT workflow_id FROM ledger WHERE kind = 'outcome'")


def ticket_ids(seed: int) -> list[str]:
    return [f"support_desk-TK-{seed}-{i + 1:04d}" for i in range(N)]


async def test_a_batch_killed_and_run_again_answers_every_customer_once(tmp_path: Path, db_url: str) -> None:
    seed = 31
    async with stack(tmp_path, db_url) as (server, env):
        cli = cli_env(server, env, tmp_path)
        first = batch(cli, seed)
        await until(lambda: len(outcomes(env)) >= 2, "two tickets answered")
        first.send_signal(signal.SIGKILL)  # mid-batch: some tickets answered, some running, some not started
        first.wait()
        answered_before = {r["workflow_id"] for r in outcomes(env)}
        assert len(answered_before) < N
        again = await asyncio.to_thread(subprocess.run, [*KEEL, "ticket", "batch", "--sample", str(N), "--sim-seed",
                                                         str(seed), "--spiral-rate", "0", "--sim-latency", "200-600",
                                                         "-k", "3", "--json"],
                                        env=cli, cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
        assert again.returncode == 0, again.stderr
        items = json.loads(again.stdout)
        runs = {wid: [w async for w in env.client.list_workflows(f"WorkflowId = '{wid}'")] for wid in ticket_ids(seed)}
        done = outcomes(env)
        queued = rows(env.engine, "SELECT workflow_id FROM human_queue")
        desk = store.engine_for()  # the desk's tables, in the same database, made on first use
        refunds = rows(desk, f"SELECT workflow_id FROM {store.refunds.name}")
        cases = rows(desk, f"SELECT workflow_id FROM {store.cases.name}")
    assert [i["workflow_id"] for i in items] == ticket_ids(seed)
    assert all(i.get("error") in (None, "") for i in items), items
    for i in items:  # the first run's answered tickets are found, not run again
        if i["workflow_id"] in answered_before:
            assert i["existing"], i
    assert {wid: len(r) for wid, r in runs.items()} == {wid: 1 for wid in ticket_ids(seed)}  # one run per ticket
    answered = [r["workflow_id"] for r in done]
    assert len(answered) == len(set(answered))  # one outcome per ticket
    waiting = ("awaiting_approval", "awaiting_human")
    assert set(answered) == {i["workflow_id"] for i in items if i["status"] not in waiting}
    for table in (queued, refunds, cases):
        ids = [r["workflow_id"] for r in table]
        assert len(ids) == len(set(ids)), table


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_an_interrupted_batch_says_what_finished_and_what_is_pending(
        tmp_path: Path, db_url: str, sig: signal.Signals, code: int) -> None:
    seed = 32 if sig == signal.SIGTERM else 34
    async with stack(tmp_path, db_url) as (server, env):
        cli = cli_env(server, env, tmp_path)
        run = batch(cli, seed)
        # A 4th ticket answered was started after the client settled one of the first 3 (-k 3).
        await until(lambda: len(outcomes(env)) >= 4, "four tickets answered")
        run.send_signal(sig)  # kill, or Ctrl-C
        out, said = await asyncio.to_thread(run.communicate, timeout=WAIT_S)
    assert run.returncode == code, said
    assert f"interrupted ({sig.name})" in said and f"pending support_desk-TK-{seed}-" in said, said
    assert "run the same command again to resume" in said
    assert "support tickets" in out  # the table of those that finished


async def test_a_batch_rides_out_a_server_restart(tmp_path: Path, db_url: str) -> None:
    seed = 33
    async with stack(tmp_path, db_url) as (server, env):
        cli = cli_env(server, env, tmp_path)
        run = batch(cli, seed, "--json")
        await until(lambda: len(outcomes(env)) >= 2, "two tickets answered")
        server.stop()
        await asyncio.sleep(2)  # down for a while, as a restart is
        await server.start()
        out, said = await asyncio.to_thread(run.communicate, timeout=WAIT_S)
    assert run.returncode == 0 and out.strip(), said
    assert out.lstrip().startswith("["), out[:2000]
    items = json.loads(out)
    assert [i["workflow_id"] for i in items] == ticket_ids(seed)
    assert all(not i.get("error") for i in items), items
    assert all(i["status"] in ("completed", "escalated", "awaiting_approval", "awaiting_human") for i in items), items


@pytest.fixture(autouse=True)
def _short_model_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call lost in the restart is retried after this (the worker's setting), not after the default minute."""
    monkeypatch.setenv("KEEL_LLM_TIMEOUT_S", "10")
