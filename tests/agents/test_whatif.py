"""What-if replay of a KeelAgent task (`keel replay ID --prompt-version V` / `--model`), on the real
Temporal server: the agent's own steps run again in this process with real model calls (ledger rows
under the what-if's id, feature "what-if"), tool results served from the original history, and a call
never recorded answered "not executed": a what-if runs no tool, read or write."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import text
from temporalio.client import Client

import keel
from activities.prompts import load_prompt_at
from agents.oncall import agent as oncall_module
from agents.oncall.agent import restart_service, service_status, status_before_restart
from agents.oncall.status_service import StatusService
from agents.support_desk import store, support_desk
from agents.support_desk.data import build_seed
from keel import registry
from keel.testing import SCRIPTED, AgentEnvironment, ScriptedModel, agent_environment, answer, call
from keel.types import LlmRequest, ProviderResult
from starter import inspect_cli
from starter.approvals_cli import decide, pending_action
from starter.inspect_cli import NOT_RECORDED, WHAT_IF_FEATURE, InspectError, print_what_if, what_if
from tests.agents.test_oncall import cli_env, env_for, keel_cli
from tests.conftest import assert_eventually

HERE = Path(__file__).parent

sre = keel.Agent(
    name="sre",
    prompt=HERE / "prompts" / "sre.v1.md",
    tools=[service_status, restart_service],
    models={"small": "sim:sim-small", "large": "sim:sim-large"},
    budget=keel.Budget(max_tokens=20_000, max_usd=0.5),
    approvers={"restart_service": ["sre-lead"]},
    validators=[status_before_restart],
)
"""A test agent with two prompt versions that differ in what they ask for (tests/agents/prompts/sre.*)."""

DOWN = "The payments service is down, please fix it."


@dataclass
class ByPrompt:
    """A model that follows its prompt: each prompt version has its script, chosen by a marker in the
    system prompt the LLM activity sends, so the path a task takes depends on its prompt alone."""

    scripts: dict[str, ScriptedModel]
    name: str = "scripted"

    async def complete(self, req: LlmRequest, system: str) -> ProviderResult:
        for marker, model in self.scripts.items():
            if marker in system:
                return await model.complete(req, system)
        raise AssertionError(f"no script for this system prompt: {system[:120]!r}")


@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatusService]:
    with StatusService() as svc:
        monkeypatch.setenv("ONCALL_STATUS_URL", svc.url)
        yield svc


@pytest.fixture
def desk_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The support desk's tables beside the ledger, in one database (as in production)."""
    url = f"sqlite:///{tmp_path / 'keel.db'}"
    monkeypatch.setenv("KEEL_DATABASE_URL", url)
    store.reset()
    yield url
    store.reset()


@pytest.fixture
def http_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every request the on-call tools make to the status service (reads and writes), in order."""
    made: list[tuple[str, str]] = []
    real = oncall_module._http

    def counted(method: str, path: str, *args: Any, **kw: Any) -> dict[str, object]:
        made.append((method, path))
        return real(method, path, *args, **kw)

    monkeypatch.setattr(oncall_module, "_http", counted)
    return made


def ledger(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        rows = conn.execute(text("SELECT step, kind, tool, feature, task_type, tenant, prompt_version, prompt_hash "
                                 "FROM ledger WHERE workflow_id = :w ORDER BY step, kind"), {"w": workflow_id})
        return [dict(r._mapping) for r in rows]


def counts(env: AgentEnvironment) -> dict[str, int]:
    """Rows a tool or a finished task writes: the what-if must write none of them."""
    with env.engine.connect() as conn:
        return {
            "tool_rows": conn.execute(text("SELECT count(*) FROM ledger WHERE kind = 'tool'")).scalar_one(),
            "outcome_rows": conn.execute(text("SELECT count(*) FROM ledger WHERE kind = 'outcome'")).scalar_one(),
            "human_queue": conn.execute(text("SELECT count(*) FROM human_queue")).scalar_one(),
        }


async def approved_restart(env: AgentEnvironment, client: Client, **fields: Any) -> keel.AgentResult:
    """A task of `fields["agent"]` (default oncall) that proposes a restart, approved by sre-lead."""
    handle = await env.start(fields.pop("agent", "oncall"), DOWN, **fields)
    await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
    await decide(client, handle.id, "sre-lead", "approve", comment="go")
    result: keel.AgentResult = await handle.result()
    return result


async def test_a_what_if_on_the_same_version_reproduces_an_approved_restart_and_runs_no_tool(
        client: Client, status: StatusService, http_calls: list[tuple[str, str]], tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        res = await approved_restart(env, client, tenant="team-pay")
        assert res.status == "completed", res.reason
        assert res.tools_executed == ["service_status", "restart_service"] and len(status.restarts) == 1
        made, restarts, services = list(http_calls), dict(status.restarts), json.dumps(status.services)
        rows, written = ledger(env, res.workflow_id), counts(env)

        report = await what_if(client, env.settings, res.workflow_id, prompt_version="v1", engine=env.engine)

        # Nothing ran through a tool: no request to the service (read or write), no second restart, no
        # tool or outcome row, nothing queued for a human; the original's rows are untouched.
        assert http_calls == made and status.restarts == restarts and json.dumps(status.services) == services
        assert counts(env) == written and ledger(env, res.workflow_id) == rows

    assert report.changes == {} and report.not_executed == []
    assert report.same_path and report.first_difference is None
    old, new = report.old, report.new
    assert old.path == ["reason -> service_status", "tool service_status", "reason -> restart_service",
                        "tool restart_service", "reason"]
    assert [s.note for s in new.steps if s.kind == "tool"] == ["recorded result", "recorded result"]
    assert (old.agent, new.agent) == ("oncall", "oncall")
    assert old.status == new.status == "completed"
    assert old.tools_executed == new.tools_executed == res.tools_executed
    assert old.answer == new.answer == res.output and "Restart" in new.answer
    assert old.tokens == new.tokens == res.tokens and new.cost_usd == pytest.approx(res.cost_usd)
    assert (old.prompt_version, new.prompt_version) == ("v1", "v1") and new.models == res.models
    # The recorded decision was applied to the same action: no note of a missing or changed decision.
    assert not [n for n in report.notes if "restart_service#1" in n], report.notes

    # The model calls are real: ledger rows under the what-if's own id, tagged feature "what-if".
    assert report.whatif_workflow_id.startswith(f"whatif-{res.workflow_id}-")
    whatif_rows = ledger(env, report.whatif_workflow_id)
    assert [r["kind"] for r in whatif_rows] == ["llm"] * res.llm_calls
    assert {(r["feature"], r["task_type"], r["tenant"], r["prompt_version"]) for r in whatif_rows} == {
        (WHAT_IF_FEATURE, "oncall", "team-pay", "v1")}


async def test_a_what_if_on_another_prompt_version_takes_another_path_and_executes_nothing_unrecorded(
        client: Client, status: StatusService, http_calls: list[tuple[str, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = ScriptedModel([
        call("service_status", service="payments"),
        call("restart_service", service="payments", reason="payments is down"),
        answer("payments was down (error rate 0.61); the approved restart ran."),
    ])
    v2 = ScriptedModel([
        call("service_status", service="payments"),
        call("service_status", service="payments-db"),
        answer("payments is down (error rate 0.61); its database's status could not be read. "
               "Not restarting: over to the SRE lead."),
    ])
    model = ByPrompt({"(prompt sre v1)": v1, "(prompt sre v2)": v2})
    models = {"small": SCRIPTED, "large": SCRIPTED}
    async with agent_environment(sre, client=client, providers={"scripted": model}, home=tmp_path) as env:
        res = await approved_restart(env, client, agent="sre", models=models, tenant="team-pay")
        v1.assert_all_used()
        assert res.status == "completed" and res.tools_executed == ["service_status", "restart_service"], res
        made, restarts, written = list(http_calls), dict(status.restarts), counts(env)

        report = await what_if(client, env.settings, res.workflow_id, prompt_version="v2", engine=env.engine,
                               providers={"scripted": model})

        assert http_calls == made and status.restarts == restarts and len(restarts) == 1
        assert counts(env) == written
        whatif_rows = ledger(env, report.whatif_workflow_id)
    v2.assert_all_used()  # the v2 prompt reached the model: its script, and only it, answered the what-if
    assert all("(prompt sre v2)" in c.system for c in v2.calls)

    assert report.changes == {"prompt_version": ("v1", "v2")}
    assert not report.same_path and report.first_difference == 2
    assert report.new.path == ["reason -> service_status", "tool service_status", "reason -> service_status",
                               "tool service_status", "reason"]
    # The first status read was recorded (same tool, same arguments): served. The database's never was:
    # not executed, and the model was told so, like any tool error.
    served, unrecorded = [s for s in report.new.steps if s.kind == "tool"]
    assert (served.ok, served.note) == (True, "recorded result")
    assert (unrecorded.ok, unrecorded.note) == (False, "not recorded: not executed")
    assert report.not_executed == [f'step {unrecorded.step}: service_status:{{"service":"payments-db"}}']
    assert NOT_RECORDED in v2.calls[2].messages[-1].content
    assert ("GET", "/services/payments-db") not in http_calls

    assert report.old.tools_executed == ["service_status", "restart_service"]
    assert report.new.tools_executed == ["service_status"]
    assert report.new.status == "completed" and "Not restarting" in report.new.answer
    assert report.old.answer == res.output and report.new.tokens != report.old.tokens
    v2_hash = load_prompt_at(sre.prompt_dir, "sre", "v2").short_hash
    assert [r["kind"] for r in whatif_rows] == ["llm", "llm", "llm"]
    assert {(r["feature"], r["task_type"], r["prompt_version"], r["prompt_hash"]) for r in whatif_rows} == {
        (WHAT_IF_FEATURE, "sre", "v2", v2_hash)}

    # What the model said at each call of both runs, side by side (what-if --content): the texts and
    # calls of the original (from its history) beside the what-if's, the changed ones marked.
    said = {run: [s.content for s in summary.steps if s.kind != "tool"]
            for run, summary in (("old", report.old), ("new", report.new))}
    assert [c.tool_calls[0].arguments if c and c.tool_calls else c and c.text for c in said["new"]] == [
        '{"service": "payments"}', '{"service": "payments-db"}', report.new.answer]
    assert said["old"][1] is not None and said["old"][1].tool_calls[0].name == "restart_service"
    assert said["old"][2] is not None and said["old"][2].text == report.old.answer
    wide = Console(width=200, record=True)
    monkeypatch.setattr(inspect_cli, "console", wide)
    print_what_if(report, content=True)
    table = wide.export_text()
    row = next(line for line in table.splitlines() if "payments was down" in line)
    assert "payments is down (error rate 0.61)" in row  # one row, the two answers side by side
    assert "≠" in next(line for line in table.splitlines() if "step 5 reason" in line)
    assert 'calls service_status {"service": "payments"}' in table and "calls restart_service" in table
    assert 'calls service_status {"service": "payments-db"}' in table
    narrow = Console(width=70, record=True)
    monkeypatch.setattr(inspect_cli, "console", narrow)
    print_what_if(report, content=True)
    panels = " ".join(narrow.export_text().replace("│", " ").split())
    assert panels.index("call 3: old") < panels.index("payments was down") < panels.index("call 3: new (changed)") \
        < panels.index("Not restarting")
    doc = report.to_json(content=True)
    assert doc["new"]["steps"][-1]["content"]["text"] == report.new.answer
    assert all("content" not in step for run in ("old", "new") for step in report.to_json()[run]["steps"])

    # A version the agent does not have: refused before any model call.
    with pytest.raises(InspectError, match=r"agent 'sre' has no prompt version 'v9' .*its versions: v1, v2"):
        await what_if(client, env.settings, res.workflow_id, prompt_version="v9", engine=env.engine)


async def test_a_what_if_of_an_agent_not_loaded_is_refused_clearly(
        client: Client, status: StatusService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    async with env_for(client, home=tmp_path) as env:
        res = await env.run("oncall", "Is the api service healthy?")
    assert res.status == "completed", res.reason
    monkeypatch.setattr(registry, "_AGENTS", {})  # as in a `keel` process started without --agents
    with pytest.raises(InspectError) as e:
        await what_if(client, env.settings, res.workflow_id, prompt_version="v2", engine=env.engine)
    said = str(e.value)
    assert f"{res.workflow_id!r} runs agent 'oncall', not loaded in this process" in said
    assert "pass --agents MODULES" in said and "KEEL_AGENTS" in said
    with env.engine.connect() as conn:  # refused before any model call
        assert conn.execute(text("SELECT count(*) FROM ledger WHERE workflow_id LIKE :w"),
                            {"w": f"whatif-{res.workflow_id}-%"}).scalar_one() == 0


async def test_keel_replay_what_if_of_an_agent_task(
        client: Client, status: StatusService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with env_for(client, home=tmp_path) as env:
        res = await approved_restart(env, client)
        cli = cli_env(env, tmp_path)
    assert res.status == "completed", res.reason
    restarts = dict(status.restarts)
    monkeypatch.setattr(registry, "_AGENTS", {})  # a fresh `keel` process: the agent comes from --agents

    missing = await keel_cli(cli, "replay", res.workflow_id, "--prompt-version", "v2")
    said = " ".join(missing.output.split())  # the error console wraps long lines
    assert missing.exit_code == 1, said
    assert "runs agent 'oncall', not loaded in this process" in said and "--agents MODULES" in said

    shown = await keel_cli(cli, "replay", res.workflow_id, "--prompt-version", "v2", "--agents", "agents.oncall")
    assert shown.exit_code == 0, shown.output
    for want in (f"What-if of {res.workflow_id}: prompt_version v1 -> v2", "old: call", "new: call",
                 "reason -> service_status", "tool restart_service", "agent", "oncall", "completed", "answer",
                 "same path", f"whatif-{res.workflow_id}-"):
        assert want in shown.output, (want, shown.output)

    out = await keel_cli(cli, "replay", res.workflow_id, "--prompt-version", "v2", "--model", "sim:sim-small",
                         "--agents", "agents.oncall", "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)  # one object
    assert doc["changes"] == {"prompt_version": ["v1", "v2"], "large_model": ["sim-large [sim (offline simulator)]",
                                                                             "sim-small [sim (offline simulator)]"]}
    assert doc["old"]["agent"] == doc["new"]["agent"] == "oncall" and doc["not_executed"] == []
    assert doc["old"]["tools_executed"] == doc["new"]["tools_executed"] == ["service_status", "restart_service"]
    assert doc["new"]["prompt_version"] == "v2" and doc["new"]["models"] == ["sim-small [sim (offline simulator)]"]
    assert doc["old"]["answer"] == res.output and doc["new"]["status"] == "completed"
    assert doc["same_path"] is True  # the sim plays oncall from the conversation, not the prompt's words
    rows = ledger(env, doc["whatif_workflow_id"])
    assert rows and {(r["kind"], r["feature"], r["prompt_version"]) for r in rows} == {("llm", WHAT_IF_FEATURE, "v2")}
    assert status.restarts == restarts  # the approved restart was served from the history, not run again

    said = await keel_cli(cli, "replay", res.workflow_id, "--prompt-version", "v2", "--agents", "agents.oncall",
                          "--content")
    assert said.exit_code == 0, said.output
    assert "what the model said: old  |  new" in said.output and "calls service_status" in said.output
    assert " ".join(res.output.split()[:4]) in said.output  # the original's answer, beside the what-if's
    assert "what the model said" not in shown.output  # off by default
    alone = await keel_cli(cli, "replay", res.workflow_id, "--content")
    assert alone.exit_code == 2 and "use it with --prompt-version or --model" in " ".join(alone.output.split())

    bad = await keel_cli(cli, "replay", res.workflow_id, "--prompt-version", "v9", "--agents", "agents.oncall")
    said = " ".join(bad.output.split())
    assert bad.exit_code == 1 and "agent 'oncall' has no prompt version 'v9'" in said, said


async def test_a_what_if_of_an_approved_refund_on_another_model_goes_through_triage_and_refunds_nothing(
        client: Client, desk_db: str) -> None:
    seed = build_seed()
    dup = next(t for t in seed["transactions"] if t["customer_id"] == "C-1001" and t["duplicate_of"])
    request = (f"Customer: C-1001\n\nI was charged twice at {dup['merchant']} for {dup['amount']:.2f} EUR. "
               "Please refund the duplicate charge.")

    def desk_rows(env: AgentEnvironment) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        store.engine_for()
        with env.engine.connect() as conn:
            return ([dict(r._mapping) for r in conn.execute(text("SELECT * FROM support_desk_refunds"))],
                    [dict(r._mapping) for r in conn.execute(text("SELECT * FROM support_desk_accounts"))])

    async with agent_environment(support_desk, client=client, db_url=desk_db) as env:
        handle = await env.start("support_desk", request, tenant="C-1001")
        await assert_eventually(lambda: pending_action(client, handle.id), lambda a: a is not None)
        await decide(client, handle.id, "support-lead", "approve", comment="duplicate")
        res = await handle.result()
        assert res.status == "completed", res.reason
        assert res.tools_executed == ["get_account", "get_transactions", "lookup_policy", "issue_refund"]
        refunded, written = desk_rows(env), counts(env)
        assert len(refunded[0]) == 1

        report = await what_if(client, env.settings, res.workflow_id, model="sim:sim-small", engine=env.engine)

        assert desk_rows(env) == refunded and counts(env) == written  # no second refund, no balance change
        whatif_rows = ledger(env, report.whatif_workflow_id)
    assert set(report.changes) == {"large_model"}  # the triage step was on sim-small already
    assert report.new.models == ["sim-small [sim (offline simulator)]"]
    # The agent workflow's own steps: the triage call first, then the tool loop; the recorded approval
    # of the refund was applied to the same action, and the refund served from the history.
    assert report.new.steps[0].kind == report.old.steps[0].kind == "classify"
    assert report.same_path and report.not_executed == []
    assert report.new.tools_executed == res.tools_executed and report.new.answer == res.output
    assert {(r["kind"], r["feature"], r["task_type"]) for r in whatif_rows} == {("llm", WHAT_IF_FEATURE,
                                                                                  "support_desk")}
