"""Settings, not source edits (#14 item 4): prices for models outside the table from KEEL_PRICES (a file
or inline JSON; self-hosted models explicit and labelled), and every command's tasks and every pattern's
children on KEEL_MODEL_SMALL / KEEL_MODEL_LARGE unless the command says otherwise. On the dev server with
the real workflows; a user-priced OpenAI model answers from the loopback server."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import text
from temporalio.client import Client
from temporalio.worker import Replayer
from typer.testing import CliRunner

import keel
from activities.providers.openai_provider import OpenAIProvider
from agents.support_desk import support_desk
from agents.triage.agent import triage
from keel import pricing
from keel.errors import AgentDefinitionError
from keel.orchestration import ChildTask
from keel.pricing import PricesError, UnpricedModelError, parse_prices, price_for
from keel.settings import KeelSettings
from keel.testing import AgentEnvironment, agent_environment
from keel.types import ModelSpec
from starter.agents import as_configured, command_models
from starter.views import agent_result_view, label_self_hosted
from tests.providers.fake_servers import FakeServer, Reply, openai_completion
from workers.worker import STRICT_SANDBOX
from workflows.registry import WORKFLOWS

FEE = "Customer: C-1003\n\nWhy was I charged a fee on my statement?"
PROMPT = Path(__file__).parent / "prompts" / "labeler.v1.md"
HOUSE = {"sim:sim-house-small": {"input": 0.5, "output": 1.5}, "sim:sim-house-large": {"input": 4.0, "output": 12.0}}


@pytest.fixture(autouse=True)
def fresh_prices(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No KEEL_* model or price settings from the developer's shell; the process's user prices forgotten after."""
    for var in ("KEEL_PRICES", "KEEL_MODEL_SMALL", "KEEL_MODEL_LARGE"):
        monkeypatch.delenv(var, raising=False)
    yield
    pricing.use_prices({})


def rows(env: AgentEnvironment, sql: str, **params: Any) -> list[dict[str, Any]]:
    with env.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def llm_rows(env: AgentEnvironment, workflow_id: str) -> list[dict[str, Any]]:
    return rows(env, "SELECT provider, model, tier, input_tokens, output_tokens, cost_usd FROM ledger "
                     "WHERE (workflow_id = :w OR parent_workflow_id = :w) AND kind = 'llm' ORDER BY step",
                w=workflow_id)


def rendered(x: Any) -> str:
    console = Console(width=400, record=True)
    console.print(x)
    return console.export_text()


# --- KEEL_PRICES: parsed, validated, clear errors --------------------------------------------------


def test_prices_from_inline_json_a_json_file_and_a_toml_file(tmp_path: Path) -> None:
    inline = parse_prices('{"openai:house": {"input": 0.2, "output": 0.8, "cached_input": 0.05}}')
    assert inline["openai:house"].input == 0.2 and inline["openai:house"].cached_input == 0.05
    assert not inline["openai:house"].self_hosted
    js = tmp_path / "prices.json"
    js.write_text(json.dumps({"openai:qwen2.5-1.5b": {"self_hosted": True}}))
    hosted = parse_prices(str(js))["openai:qwen2.5-1.5b"]
    assert hosted.self_hosted and hosted.input == 0 and hosted.output == 0
    toml = tmp_path / "prices.toml"
    toml.write_text('["openai:gpt-4o"]\ninput = 2.0\noutput = 7.0\n\n'
                    '["openai:local-llama"]\nself_hosted = true\ninput = 0.01\noutput = 0.03\n')
    table = parse_prices(str(toml))
    assert table["openai:gpt-4o"].output == 7.0
    assert table["openai:local-llama"].self_hosted and table["openai:local-llama"].output == 0.03
    assert parse_prices(None) == {} and parse_prices("  ") == {}


def test_user_prices_override_and_extend_the_table() -> None:
    pricing.use_prices(parse_prices('{"openai:gpt-4o": {"input": 1.0, "output": 2.0}, '
                                    '"openai:house": {"input": 3.0, "output": 4.0}}'))
    assert price_for("openai", "gpt-4o").input == 1.0
    assert price_for("openai", "house").output == 4.0
    assert price_for("openai", "gpt-4o-mini").input == 0.15  # the rest of the table as it is
    pinned = {"openai:house": keel.types.Price(input=9.0, output=9.0)}
    assert price_for("openai", "house", pinned=pinned).input == 9.0  # a task's pinned prices first


@pytest.mark.parametrize(("content", "suffix", "expected"), [
    ('{"openai:x": {"input": 1}}', ".json", ["entry 'openai:x'", '"output" missing', "self_hosted"]),
    ('{"openai:x": {"input": -1, "output": 1}}', ".json", ["entry 'openai:x'", "input", "greater than or equal"]),
    ('{"openai:x": {"input": 1, "output": 1, "price": 3}}', ".json", ["entry 'openai:x'", "price", "Extra"]),
    ('{"gpt-4o": {"input": 1, "output": 1}}', ".json", ["entry 'gpt-4o'", "provider:model"]),
    ('{"mistral:small": {"input": 1, "output": 1}}', ".json", ["entry 'mistral:small'", "unknown provider"]),
    ('{"openai:x": 0.5}', ".json", ["entry 'openai:x'", "dictionary"]),
    ('["openai:x"]', ".json", ['must map "provider:model" to a price']),
    ("{not json", ".json", ["not valid JSON"]),
    ('["openai:x"]\ninput = \n', ".toml", ["not valid TOML"]),
])
def test_a_bad_prices_file_names_the_file_and_the_entry(tmp_path: Path, content: str, suffix: str,
                                                       expected: list[str]) -> None:
    path = tmp_path / f"prices{suffix}"
    path.write_text(content)
    with pytest.raises(PricesError) as bad:
        parse_prices(str(path))
    message = str(bad.value)
    assert f"KEEL_PRICES file {path}" in message, message
    for part in expected:
        assert part in message, message


def test_a_missing_file_and_bad_inline_json_are_clear(tmp_path: Path) -> None:
    with pytest.raises(PricesError, match=r"KEEL_PRICES file .*nowhere\.json: no such file"):
        parse_prices(str(tmp_path / "nowhere.json"))
    with pytest.raises(PricesError, match=r"KEEL_PRICES \(inline JSON\): not valid JSON"):
        parse_prices('{"openai:x": ')


def test_an_unpriced_model_is_refused_and_the_error_says_how_to_price_it() -> None:
    with pytest.raises(UnpricedModelError) as refused:
        price_for("openai", "qwen-unpriced")
    message = str(refused.value)
    assert "no price for openai:qwen-unpriced" in message
    assert 'KEEL_PRICES=\'{"openai:qwen-unpriced": {"input": 0.15, "output": 0.60}}\'' in message
    assert '"self_hosted": true' in message and "keel/pricing.py" not in message


def test_an_agent_declared_with_a_user_priced_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AgentDefinitionError, match="KEEL_PRICES"):
        keel.Agent(name="house_model_agent", prompt=PROMPT, models="openai:house-model")
    pricing.use_prices(parse_prices('{"openai:house-model": {"input": 0.3, "output": 0.9}}'))
    agent = keel.Agent(name="house_model_agent", prompt=PROMPT, models="openai:house-model")
    assert agent.model_specs["large"] == ModelSpec(provider="openai", model="house-model")


def cli(env: dict[str, str], *extra: str) -> tuple[int, str]:
    """`keel run support_desk hello ...`: its exit code and its output, lines joined."""
    from starter.cli import app

    done = CliRunner().invoke(app, ["run", "support_desk", "hello", *extra], env=env)
    return done.exit_code, " ".join(done.output.split())


def test_the_cli_refuses_bad_prices_and_an_unpriced_model_setting_before_any_task(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"openai:x": {"input": 1}}')
    # Nothing listens at this address: a refusal here comes before any connection, let alone a task.
    nowhere = {"TEMPORAL_ADDRESS": "127.0.0.1:9"}
    code, out = cli({**nowhere, "KEEL_PRICES": str(path)})
    assert code == 2 and f"KEEL_PRICES file {path}: entry 'openai:x'" in out and "Traceback" not in out, out
    code, out = cli({**nowhere, "KEEL_MODEL_LARGE": "openai:nope"})
    assert code == 2 and "KEEL_MODEL_LARGE=openai:nope: no price for openai:nope" in out, out
    assert "KEEL_PRICES" in out and "Traceback" not in out
    code, out = cli(nowhere, "--model", "openai:nope")
    assert code == 2 and "no price for openai:nope" in out and "KEEL_PRICES" in out, out


def test_worker_start_refuses_bad_prices_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "prices.toml"
    path.write_text('["openai:x"]\noutput = 1\n')
    done = subprocess.run([sys.executable, "-m", "workers"], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "KEEL_PRICES": str(path), "TEMPORAL_ADDRESS": "127.0.0.1:9"})
    assert done.returncode == 2, done.stderr
    assert f"KEEL_PRICES file {path}: entry 'openai:x'" in done.stderr and "Traceback" not in done.stderr


# --- KEEL_MODEL_*: one place decides a command's models ------------------------------------------


def test_the_default_model_settings_force_nothing_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert command_models(KeelSettings()) is None  # agents keep their own models
    inp = as_configured(KeelSettings(), keel.AgentInput(agent="a", input="x"))
    assert inp.models is None and inp.prices == {}
    monkeypatch.setenv("KEEL_PRICES", json.dumps(HOUSE))
    monkeypatch.setenv("KEEL_MODEL_LARGE", "sim:sim-house-large")
    settings = KeelSettings()
    pricing.load_prices(settings.prices)
    assert command_models(settings) == {"large": ModelSpec(model="sim-house-large")}
    both = ModelSpec(model="sim-small")
    assert command_models(settings, "sim:sim-small") == {"small": both, "large": both}
    mine = as_configured(settings, keel.AgentInput(agent="a", input="x", models={"large": both}))
    assert mine.models == {"large": both}  # what the input sets itself wins
    assert set(mine.prices) == set(HOUSE)  # the user's prices pinned in the task


# --- on the dev server -------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s


@pytest.fixture
async def openai_provider(server: FakeServer) -> AsyncIterator[OpenAIProvider]:
    p = OpenAIProvider(api_key="test-key", base_url=f"{server.url}/v1", timeout_s=10)
    yield p
    await p.aclose()


async def test_a_user_priced_and_a_self_hosted_model_cost_what_was_declared(
    client: Client, db_url: str, monkeypatch: pytest.MonkeyPatch, server: FakeServer, openai_provider: OpenAIProvider,
) -> None:
    monkeypatch.setenv("KEEL_PRICES", json.dumps({
        "openai:house-model": {"input": 0.3, "output": 0.9, "cached_input": 0.1},
        "openai:qwen-local": {"self_hosted": True, "input": 0.02, "output": 0.05},
    }))
    pricing.load_prices(KeelSettings().prices)
    agent = keel.Agent(name="priced_labeler", prompt=PROMPT, models="openai:house-model",
                       budget=keel.Budget(max_tokens=None, max_usd=None))
    server.script(Reply(body=openai_completion(content="billing", model="house-model", prompt_tokens=1200,
                                               completion_tokens=300, cached_tokens=200)),
                  Reply(body=openai_completion(content="billing", model="qwen-local", prompt_tokens=1000,
                                               completion_tokens=100)))
    async with agent_environment(agent, client=client, db_url=db_url,
                                 providers={"openai": openai_provider}) as env:
        priced = await env.run("priced_labeler", "Why was I charged twice?", key=uuid.uuid4().hex)
        hosted = await env.run("priced_labeler", "Why was I charged twice?", key=uuid.uuid4().hex,
                               models={"large": ModelSpec(provider="openai", model="qwen-local")})
        priced_rows, hosted_rows = llm_rows(env, priced.workflow_id), llm_rows(env, hosted.workflow_id)
    assert priced.status == "completed" and hosted.status == "completed", (priced.reason, hosted.reason)
    declared = (1000 * 0.3 + 200 * 0.1 + 300 * 0.9) / 1_000_000
    assert [r["cost_usd"] for r in priced_rows] == [pytest.approx(declared)]
    assert priced.cost_usd == pytest.approx(declared) and priced.models == ["openai:house-model"]
    assert [r["cost_usd"] for r in hosted_rows] == [pytest.approx((1000 * 0.02 + 100 * 0.05) / 1_000_000)]
    assert hosted.models == ["openai:qwen-local [self-hosted]"]
    assert "self-hosted: costs are your declared estimate" in rendered(agent_result_view(hosted))
    assert "self-hosted" not in rendered(agent_result_view(priced))
    costs = label_self_hosted([{"provider": "openai", "model": "qwen-local", "cost_usd": 0.1},
                               {"provider": "openai", "model": "house-model", "cost_usd": 0.2}])
    assert [r["model"] for r in costs] == ["qwen-local [self-hosted]", "house-model"]


async def test_model_settings_apply_to_a_task_and_to_every_pattern_child(
    client: Client, db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEEL_PRICES", json.dumps(HOUSE))
    monkeypatch.setenv("KEEL_MODEL_SMALL", "sim:sim-house-small")
    monkeypatch.setenv("KEEL_MODEL_LARGE", "sim:sim-house-large")
    async with agent_environment(support_desk, triage, client=client, db_url=db_url) as env:
        task = await env.run("support_desk", FEE, tenant="C-1003", key=uuid.uuid4().hex)
        flagged = await env.run("support_desk", FEE, tenant="C-1003", key=uuid.uuid4().hex,
                                models=command_models(env.settings, "sim:sim-large"))
        orchestrated = await env.orchestrate(FEE, tasks=[ChildTask(agent="support_desk", input=FEE)],
                                             tenant="C-1003", key=uuid.uuid4().hex)
        voted = await env.vote("triage", "I was charged twice for one purchase", "category", peers=2,
                               key=uuid.uuid4().hex)
        task_rows, flagged_rows = llm_rows(env, task.workflow_id), llm_rows(env, flagged.workflow_id)
        child_rows, peer_rows = llm_rows(env, orchestrated.workflow_id), llm_rows(env, voted.workflow_id)
    assert task.status == "completed", task.reason
    assert {(r["tier"], r["model"]) for r in task_rows} == {("small", "sim-house-small"), ("large", "sim-house-large")}
    # The task carries the prices it started with: it replays the same with no user prices in this
    # process (unpinned, its budget checks would now find its models unpriced and take another path).
    pricing.use_prices({})
    with pytest.raises(UnpricedModelError):
        price_for("sim", "sim-house-large")
    history = await client.get_workflow_handle(task.workflow_id).fetch_history()
    await Replayer(workflows=WORKFLOWS, workflow_runner=STRICT_SANDBOX,
                   data_converter=client.data_converter).replay_workflow(history)
    declared = sum((r["input_tokens"] * HOUSE[f"sim:{r['model']}"]["input"]
                    + r["output_tokens"] * HOUSE[f"sim:{r['model']}"]["output"]) / 1e6 for r in task_rows)
    assert task.cost_usd == pytest.approx(declared)
    assert {r["model"] for r in flagged_rows} == {"sim-large"}  # the command's --model wins
    assert child_rows and {(r["tier"], r["model"]) for r in child_rows} == {
        ("small", "sim-house-small"), ("large", "sim-house-large")}
    assert peer_rows and {r["model"] for r in peer_rows} <= {"sim-house-small", "sim-house-large"}
    assert len({r["provider"] for r in peer_rows}) == 1 and voted.children and all(
        c.status != "failed" for c in voted.children)
    assert [a.model for a in voted.answers] == ["sim-house-small / sim-house-large"] * 2  # shown per peer


async def test_without_model_settings_agents_keep_their_own_models(client: Client, db_url: str) -> None:
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        task = await env.run("support_desk", FEE, tenant="C-1003", key=uuid.uuid4().hex)
        models = {(r["tier"], r["model"]) for r in llm_rows(env, task.workflow_id)}
    assert models == {("small", "sim-small"), ("large", "sim-large")}


async def test_model_settings_apply_to_the_supervisors_worker_and_reviewer(
    client: Client, db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agents.dr_plan import AGENTS as DR_PLAN
    from agents.dr_plan import supervision

    monkeypatch.setenv("KEEL_PRICES", json.dumps(HOUSE))
    monkeypatch.setenv("KEEL_MODEL_LARGE", "sim:sim-house-large")  # the small tier stays each agent's own
    inp = supervision("payments-db primary in eu-west-1 is down: card payments failing", key=uuid.uuid4().hex)
    async with agent_environment(*DR_PLAN, client=client, db_url=db_url) as env:
        res = await env.supervise(inp.input, **inp.model_dump(exclude={"input"}))
        child_rows = llm_rows(env, res.workflow_id)
    roles = {c.role for c in res.children}
    assert {"worker", "reviewer"} <= roles, res.children
    assert child_rows and {r["model"] for r in child_rows if r["tier"] == "large"} == {"sim-house-large"}
    assert {r["model"] for r in child_rows if r["tier"] == "small"} <= {"sim-small"}


async def test_a_what_if_runs_on_the_model_settings_unless_its_flags_say_otherwise(
    client: Client, db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from starter.inspect_cli import what_if

    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        task = await env.run("support_desk", FEE, tenant="C-1003", key=uuid.uuid4().hex)
        monkeypatch.setenv("KEEL_PRICES", json.dumps(HOUSE))
        monkeypatch.setenv("KEEL_MODEL_LARGE", "sim:sim-house-large")
        settings = KeelSettings(database_url=db_url)
        pricing.load_prices(settings.prices)
        configured = await what_if(client, settings, task.workflow_id, prompt_version="v1", engine=env.engine)
        flagged = await what_if(client, settings, task.workflow_id, model="sim:sim-large", engine=env.engine)
        configured_rows = llm_rows(env, configured.whatif_workflow_id)
    assert configured.changes == {"large_model": ("sim-large [sim (offline simulator)]",
                                                  "sim-house-large [sim (offline simulator)]")}
    assert {(r["tier"], r["model"]) for r in configured_rows} == {("small", "sim-small"), ("large", "sim-house-large")}
    assert "large_model" not in flagged.changes and "small_model" in flagged.changes  # --model: every tier


def test_the_pattern_commands_label_self_hosted_costs_as_they_label_the_sims() -> None:
    from starter.views import self_hosted_note

    pricing.use_prices(parse_prices('{"openai:qwen-local": {"self_hosted": true}}'))
    hosted = {"writer": keel.AgentResult(workflow_id="w", agent="a", status="completed",
                                         models=["openai:qwen-local [self-hosted]"])}
    simulated = {"writer": keel.AgentResult(workflow_id="w", agent="a", status="completed",
                                            models=["sim-large [sim (offline simulator)]"])}
    for line in (keel.models_line,):  # the research and plan verbs' models line
        assert "self-hosted: costs are your declared estimate (KEEL_PRICES)" in line(hosted)
        assert "sim: simulated tokens and costs" in line(simulated) and "self-hosted:" not in line(simulated)
    assert "self-hosted" in self_hosted_note(["qwen-local", "qwen-local"])  # a swarm's peers, by model name
    assert self_hosted_note(["gpt-4o-mini", ""]) == ""
