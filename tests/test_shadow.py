"""Shadow mode: a candidate beside the primary on the same ticket, on the dev server with the sim model.
Its writes are never executed (no refund, reply or queue row; every write's ledger row says dry_run),
the primary acts and stays approvable, a failing candidate changes nothing for the primary, one
comparison row per ticket, deterministic selection, and the `keel shadow` commands end to end."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.worker import Replayer

from activities.db import HumanQueueRow, LedgerRow, RefundRow, ReplyRow, ShadowComparisonRow, init_db, make_engine
from activities.ledger import Ledger
from activities.shadow import record_comparison
from keel import names
from keel.dataset import build_dataset, sample_tickets
from keel.settings import KeelSettings
from keel.shadow import (
    CandidateSpec,
    CandidateSpecError,
    ShadowComparison,
    candidate_workflow_id,
    compare,
    is_shadowed,
    shadow_point,
    shadow_workflow_id,
    summarize,
)
from keel.tools import TOOLS
from keel.types import BlockedAction, ModelSpec, PatternProgress, TicketInput, TicketResult
from starter import tickets
from starter.approvals_cli import decide
from tests.conftest import assert_eventually, running_worker, ticket
from workers.worker import SANDBOX
from workflows.registry import WORKFLOWS

DS = build_dataset()
CUSTOMER = DS.customers[0]
SAMPLES = sample_tickets(16)
REFUND = next(t for t in sample_tickets(200) if t.category == "refund_request" and t.customer_id == "C-1040")
"""A customer no other test refunds: the ledger database lives for the whole session, and a duplicate charge
refunded by another test would leave nothing to refund here."""
BILLING_TEXT = "Why was I charged a fee of 4.90 EUR?"
WRITES = {name for name, t in TOOLS.items() if t.writes}


def rows(engine: Engine, table: Any, workflow_id: str) -> list[Any]:
    with Session(engine) as s:
        return list(s.exec(select(table).where(table.workflow_id == workflow_id)).all())


def tool_rows(engine: Engine, workflow_id: str) -> list[LedgerRow]:
    with Session(engine) as s:
        stmt = select(LedgerRow).where(LedgerRow.workflow_id == workflow_id, LedgerRow.kind == "tool")
        return list(s.exec(stmt).all())


async def shadowed(client: Client, settings: KeelSettings, inp: TicketInput, spec: CandidateSpec
                   ) -> WorkflowHandle[Any, TicketResult]:
    return await tickets.start_shadowed(client, settings, inp, spec, timeout_s=20)


async def outcome(client: Client, primary_id: str) -> tuple[ShadowComparison, TicketResult | None]:
    comparison = await client.get_workflow_handle(shadow_workflow_id(primary_id),
                                                  result_type=ShadowComparison).result()
    try:
        cand = await client.get_workflow_handle(candidate_workflow_id(primary_id), result_type=TicketResult).result()
    except (WorkflowFailureError, RPCError):  # failed, or never started: asserted through the comparison
        cand = None
    return comparison, cand


def assert_never_executed(engine: Engine, cand: TicketResult) -> None:
    """No write of the candidate reached the world; each was recorded in the ledger as a dry run."""
    wid = cand.workflow_id
    for table in (RefundRow, ReplyRow, HumanQueueRow):
        assert rows(engine, table, wid) == [], table
    writes = [r for r in tool_rows(engine, wid) if r.tool in WRITES]
    assert writes, "the candidate made no write at all: the test would prove nothing"
    assert all(r.dry_run is True for r in writes), [(r.tool, r.dry_run) for r in writes]
    assert all(not r.dry_run for r in tool_rows(engine, wid) if r.tool not in WRITES)
    assert sorted(r.tool for r in writes) == sorted(a.tool for a in cand.dry_run_actions)


# --- (a) the candidate's writes are never executed; the primary's are -----------------------------


async def test_refund_shadow_candidate_writes_nothing_primary_approved_and_acts(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine
) -> None:
    inp = ticket(REFUND.customer_id, REFUND.text, approval_mode="wait")
    async with worker_factory(client):
        handle = await shadowed(client, settings, inp, CandidateSpec.parse("prompt=v2"))
        # The primary is the ticket: it waits for an approval, and the usual approval reaches it.
        await assert_eventually(lambda: tickets.progress(client, handle.id),
                                lambda p: p.status == "awaiting_approval")
        await decide(client, handle.id, "alice", "approve", "verified duplicate")
        res = await handle.result()
        comparison, cand = await outcome(client, handle.id)
    assert res.status == "resolved" and res.route == "reply", res
    assert "issue_refund" in res.tools_executed
    assert len(rows(db_engine, RefundRow, handle.id)) == 1
    assert len(rows(db_engine, ReplyRow, handle.id)) == 1

    assert cand is not None and cand.category == "refund_request"
    # The candidate proposed the same refund; nobody was asked, nothing was refunded, and its hand-off
    # to the human queue was recorded, not executed.
    assert [b.tool for b in cand.tools_blocked] == ["issue_refund"]
    assert [a.tool for a in cand.dry_run_actions] == ["escalate_to_human"]
    assert cand.approvals == []
    assert_never_executed(db_engine, cand)
    assert comparison.dry_run_writes == 1 and comparison.dry_run_actions == cand.dry_run_actions
    assert [b.tool for b in comparison.proposed_writes] == ["issue_refund"]
    assert comparison.same_outcome is False  # the primary was approved; a candidate asks no one
    assert comparison.classification_agrees is True


async def test_answer_shadow_candidate_reply_recorded_not_sent(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine
) -> None:
    inp = ticket(CUSTOMER.id, BILLING_TEXT)
    async with worker_factory(client):
        handle = await shadowed(client, settings, inp, CandidateSpec.parse("model=sim:sim-small,prompt=v2"))
        res = await handle.result()
        comparison, cand = await outcome(client, handle.id)
    assert res.status == "resolved" and res.tools_executed[-1] == "send_reply"
    assert res.dry_run_actions == []
    assert len(rows(db_engine, ReplyRow, handle.id)) == 1
    assert all(not r.dry_run for r in tool_rows(db_engine, handle.id))

    assert cand is not None and cand.status == "resolved" and cand.reply
    assert [a.tool for a in cand.dry_run_actions] == ["send_reply"]
    assert json.loads(cand.dry_run_actions[0].arguments_json)["customer_id"] == CUSTOMER.id
    assert_never_executed(db_engine, cand)
    assert comparison.same_outcome is True


# --- (b) one comparison row, and it is right -------------------------------------------------------


async def test_comparison_row_written_once_and_right(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine
) -> None:
    inp = ticket(CUSTOMER.id, BILLING_TEXT)
    async with worker_factory(client):
        handle = await shadowed(client, settings, inp, CandidateSpec.parse("model=sim:sim-small"))
        prim = await handle.result()
        comparison, cand = await outcome(client, handle.id)
        progress: PatternProgress = await client.get_workflow_handle(shadow_workflow_id(handle.id)).query(
            names.PROGRESS_QUERY, result_type=PatternProgress)
    assert cand is not None
    sid = shadow_workflow_id(handle.id)
    with Session(db_engine) as s:
        stored = s.exec(select(ShadowComparisonRow).where(ShadowComparisonRow.shadow_workflow_id == sid)).all()
    assert len(stored) == 1
    row = stored[0]
    assert row.primary_workflow_id == handle.id and row.candidate_workflow_id == cand.workflow_id
    assert row.candidate == "model=sim:sim-small" and row.ticket_id == inp.ticket_id
    assert row.same_outcome and row.classification_agrees
    assert (row.primary_status, row.candidate_status) == (prim.status, cand.status) == ("resolved", "resolved")
    assert row.cost_delta_usd == pytest.approx(cand.cost_usd - prim.cost_usd, abs=1e-8)
    assert row.cost_delta_usd < 0  # the small model on every step is cheaper
    assert row.step_delta == cand.steps - prim.steps
    assert row.token_delta == cand.tokens - prim.tokens
    assert row.dry_run_writes == 1 and not row.candidate_failed
    # The same comparison again (an activity retry) writes nothing.
    assert record_comparison(db_engine, comparison) is False
    with Session(db_engine) as s:
        assert len(s.exec(select(ShadowComparisonRow).where(ShadowComparisonRow.shadow_workflow_id == sid)).all()) == 1

    # The candidate's spend is charged to feature "shadow"; the shadow's family is both children.
    with Session(db_engine) as s:
        feats = {r.workflow_id: r.feature for r in s.exec(select(LedgerRow).where(LedgerRow.kind == "llm",
                 LedgerRow.parent_workflow_id == sid)).all()}
    assert feats == {handle.id: "support", cand.workflow_id: "shadow"}
    family = Ledger(db_engine).family_totals(sid)
    assert family["llm_calls"] == prim.llm_calls + cand.llm_calls
    assert family["cost_usd"] == pytest.approx(prim.cost_usd + cand.cost_usd, abs=1e-7)
    assert progress.phase == "done" and [c.status for c in progress.children] == ["completed", "completed"]
    assert progress.tokens == prim.tokens + cand.tokens

    history = await client.get_workflow_handle(sid).fetch_history()
    await Replayer(workflows=WORKFLOWS, data_converter=pydantic_data_converter,
                   workflow_runner=SANDBOX).replay_workflow(history)


# --- (c) a failing candidate does not touch the primary --------------------------------------------


@pytest.mark.parametrize("spec, error", [
    (CandidateSpec.parse("large=openai:gpt-4o"), "ProviderAuthError"),  # provider without a key here
    # Valid when shadowing started, unpriced by the time the ticket comes (a price table change).
    (CandidateSpec(large_model=ModelSpec(provider="sim", model="sim-unpriced")),
     "candidate not started: no price for sim:sim-unpriced"),
], ids=["provider-not-configured", "unpriced-model"])
async def test_failing_candidate_leaves_primary_alone(
    client: Client, settings: KeelSettings, worker_factory: Any, db_engine: Engine, spec: CandidateSpec, error: str
) -> None:
    inp = ticket(CUSTOMER.id, BILLING_TEXT)
    async with worker_factory(client):
        handle = await shadowed(client, settings, inp, spec)
        res = await handle.result()
        comparison, cand = await outcome(client, handle.id)
    assert res.status == "resolved" and res.route == "reply" and res.reply
    assert len(rows(db_engine, ReplyRow, handle.id)) == 1
    assert cand is None
    assert comparison.candidate_failed and error in comparison.candidate_error, comparison.candidate_error
    assert comparison.same_outcome is False and comparison.cost_delta_usd is None
    assert comparison.primary_status == "resolved" and comparison.primary_cost_usd == res.cost_usd
    # What the candidate spent before it failed is counted, from the ledger (nothing, if never started).
    spent = Ledger(db_engine).task_totals(candidate_workflow_id(handle.id))
    started = "not started" not in error
    assert (comparison.candidate_cost_usd or 0.0) == pytest.approx(spent["cost_usd"], abs=1e-8)
    assert (spent["llm_calls"] > 0) == started and (comparison.candidate_cost_usd is not None) == started
    with Session(db_engine) as s:
        row = s.get(ShadowComparisonRow, shadow_workflow_id(handle.id))
    assert row is not None and row.candidate_failed and error in row.candidate_error
    assert rows(db_engine, ReplyRow, candidate_workflow_id(handle.id)) == []


# --- (d) selection and specs (pure) -----------------------------------------------------------------


def test_selection_is_deterministic_and_about_the_fraction() -> None:
    ids = [f"TK-{i:06d}" for i in range(20_000)]
    for f in (0.1, 0.25, 0.5):
        chosen = [i for i in ids if is_shadowed(i, f)]
        # Binomial: 20,000 draws, sd <= 0.0036; 4 sd of tolerance.
        assert abs(len(chosen) / len(ids) - f) < 0.015, (f, len(chosen))
        assert chosen == [i for i in ids if is_shadowed(i, f)]
        # Monotone: a ticket shadowed at f is shadowed at any larger fraction.
        assert all(is_shadowed(i, min(1.0, f + 0.2)) for i in chosen)
    assert not any(is_shadowed(i, 0.0) for i in ids)
    assert all(is_shadowed(i, 1.0) for i in ids)
    # A fixed value: the same in every process and on every machine (sha256, not Python's hash()).
    assert shadow_point("TK-000001") == 0xFF09ACBD15F53967  # first 8 bytes of its sha256
    assert is_shadowed("TK-000001", 0.9999) and not is_shadowed("TK-000001", 0.99)
    with pytest.raises(ValueError, match="between 0 and 1"):
        is_shadowed("x", 1.5)


def test_candidate_spec_parsing() -> None:
    assert CandidateSpec.parse("prompt=v2").label == "prompt=v2"
    both = CandidateSpec.parse("model=sim:sim-small")
    assert both.small_model == both.large_model == ModelSpec(provider="sim", model="sim-small")
    assert both.label == "model=sim:sim-small" and both.prompt_version is None
    mixed = CandidateSpec.parse(" large=openai:gpt-4o , prompt=v2 ")
    assert mixed.small_model is None and mixed.large_model == ModelSpec(provider="openai", model="gpt-4o")
    assert mixed.label == "prompt=v2,large=openai:gpt-4o"
    assert CandidateSpec.parse(mixed.label) == mixed
    bad = {
        "": "empty candidate spec",
        "prompt": "must look like key=value",
        "prompt=": "must look like key=value",
        "prompt=v2,": "empty part",
        "temperature=0.7": "unknown key 'temperature'",
        "prompt=v2,prompt=v3": "'prompt' is given twice",
        "model=sim:sim-small,large=sim:sim-large": "`model` sets both tiers",
        "model=gpt-4o": "must look like 'provider:model'",
        "large=mistral:large": "unknown provider 'mistral'",
        "large=openai:gpt-9": "no price for openai:gpt-9",
        "prompt=../v1": "must be 1-32 letters",
    }
    for spec, msg in bad.items():
        with pytest.raises(CandidateSpecError, match=msg.replace("(", r"\(").replace("`", "`")):
            CandidateSpec.parse(spec)


def test_candidate_input_is_a_dry_run_charged_to_shadow() -> None:
    primary = ticket(CUSTOMER.id, BILLING_TEXT, approval_mode="wait")
    primary.hold_for_human = True
    cand = CandidateSpec.parse("prompt=v2,small=sim:sim-large").apply(primary)
    assert cand.dry_run and cand.feature == "shadow" and not cand.breaker and not cand.hold_for_human
    assert cand.approval is not None and cand.approval.mode == "escalate"
    assert cand.prompt_version == "v2" and cand.small_model.model == "sim-large"
    assert cand.large_model == primary.large_model and cand.ticket_id == primary.ticket_id
    assert cand.text == primary.text and primary.dry_run is False  # the primary's input is untouched


def _result(**kw: Any) -> TicketResult:
    base: dict[str, Any] = {"workflow_id": "w", "status": "resolved", "route": "reply", "category": "card_issue",
                            "steps": 6, "tokens": 4000, "cost_usd": 0.02}
    return TicketResult.model_validate({**base, **kw})


def test_compare_and_summarize() -> None:
    prim = _result(workflow_id="p")
    write = BlockedAction(step=7, tool="send_reply", arguments_json="{}", reason="dry run")
    same = compare(prim, _result(workflow_id="c", steps=8, tokens=5000, cost_usd=0.015, dry_run_actions=[write]),
                   shadow_workflow_id="s1", candidate_workflow_id="c", candidate_label="prompt=v2")
    assert same.same_outcome and same.classification_agrees
    assert (same.cost_delta_usd, same.step_delta, same.token_delta, same.dry_run_writes) == (-0.005, 2, 1000, 1)
    # A primary a human resolved after the agent escalated it has the candidate's outcome if it escalated too.
    human = compare(_result(status="resolved_by_human", route="human"),
                    _result(status="escalated", route="human", category="fraud_report"),
                    shadow_workflow_id="s2", candidate_workflow_id="c2", candidate_label="prompt=v2")
    assert human.same_outcome and human.classification_agrees is False
    failed = compare(prim, None, shadow_workflow_id="s3", candidate_workflow_id="c3", candidate_label="prompt=v2",
                     candidate_error="ProviderAuthError: no API key")
    assert failed.candidate_failed and not failed.same_outcome and failed.cost_delta_usd is None
    other = compare(prim, _result(status="escalated", route="human"), shadow_workflow_id="s4",
                    candidate_workflow_id="c4", candidate_label="model=sim:sim-small")
    [s, o] = summarize([same, human, failed, other])
    assert (s.candidate, s.tasks, s.compared, s.candidate_failures) == ("prompt=v2", 3, 2, 1)
    assert s.same_outcome_rate == 1.0 and s.classification_agreement_rate == 0.5
    assert s.dry_run_writes == 1 and s.dry_run_by_tool == {"send_reply": 1}
    assert s.failure_reasons == {"ProviderAuthError: no API key": 1}
    assert s.failed_candidate_cost_usd == 0.0
    assert s.total_cost_delta_usd == pytest.approx(-0.005) and s.mean_cost_delta_usd == pytest.approx(-0.0025)
    assert o.same_outcome_rate == 0.0 and o.outcome_changes == {"resolved/reply -> escalated/human": 1}


# --- (e) `keel shadow` and the client hook, end to end ------------------------------------------------


@pytest.fixture
def shadow_db(tmp_path: Path) -> Iterator[Engine]:
    """A ledger of its own: an active shadow config must never reach another test's tickets."""
    engine = make_engine(f"sqlite:///{tmp_path / 'shadow.db'}")
    init_db(engine)
    yield engine
    tickets.forget_shadow_config()
    engine.dispose()


async def test_keel_shadow_cli_and_start_ticket_hook(
    client: Client, settings: KeelSettings, shadow_db: Engine, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from starter.cli import app

    settings = settings.model_copy(update={"database_url": str(shadow_db.url)})
    env = {"KEEL_DATABASE_URL": str(shadow_db.url), "COLUMNS": "200", "KEEL_HOME": str(tmp_path / "home")}

    def keel(*args: str) -> Any:
        return CliRunner().invoke(app, ["shadow", *args], env=env)

    out = keel("status")
    assert out.exit_code == 0 and "shadow mode is off" in out.output, out.output
    for bad, msg in (("prompt=v9", "incomplete: missing support/classify.v9.md"),
                     ("model=sim:nope", "no price for sim:nope"), ("colour=blue", "unknown key 'colour'")):
        out = keel("start", "--candidate", bad)
        assert out.exit_code == 2 and msg in out.output, out.output
    assert keel("start", "--candidate", "prompt=v2", "--fraction", "1.5").exit_code == 2
    assert tickets.shadow_config(settings) is None

    out = keel("start", "--candidate", "prompt=v2", "--fraction", "1")
    assert out.exit_code == 0 and "shadow mode on" in out.output and "prompt=v2" in out.output, out.output
    doc = json.loads(keel("status", "--json").output)
    assert doc["active"] is True and doc["candidate"] == "prompt=v2" and doc["fraction"] == 1.0

    async with running_worker(client, settings, shadow_db):
        inp = ticket(CUSTOMER.id, BILLING_TEXT)
        handle = await tickets.start_ticket(client, settings, inp)
        res = await tickets.settled(client, handle, inp)
        desc = await handle.describe()
        shadow_desc = await client.get_workflow_handle(shadow_workflow_id(handle.id)).describe()
        comparison = await client.get_workflow_handle(shadow_workflow_id(handle.id),
                                                      result_type=ShadowComparison).result()

        # The handle is the primary's: the normal ticket, under its normal id, a child of the shadow.
        assert handle.id.startswith(f"ticket-{inp.ticket_id}-")
        assert isinstance(res, TicketResult) and res.workflow_id == handle.id and res.status == "resolved"
        assert desc.workflow_type == names.SUPPORT_TICKET_WORKFLOW and desc.parent_id == shadow_desc.id
        assert shadow_desc.workflow_type == names.SHADOW_WORKFLOW
        assert comparison.primary_workflow_id == handle.id and comparison.candidate == "prompt=v2"

        out = keel("report", "--json")
        assert out.exit_code == 0, out.output
        [summary] = json.loads(out.output)
        assert summary["candidate"] == "prompt=v2" and summary["tasks"] == 1
        assert summary["dry_run_writes"] == comparison.dry_run_writes >= 1
        table = keel("report", "--since", "1h")
        assert table.exit_code == 0 and "candidate prompt=v2: 1 shadowed tickets" in table.output, table.output
        assert "none executed" in table.output
        assert keel("report", "--since", "yesterday-ish").exit_code == 2
        status = json.loads(keel("status", "--json").output)
        assert status["compared"] == 1 and status["candidate_failures"] == 0

        out = keel("stop")
        assert out.exit_code == 0 and "shadow mode off" in out.output
        assert tickets.shadow_config(settings) is None
        plain = await tickets.start_ticket(client, settings, ticket(CUSTOMER.id, BILLING_TEXT))
        assert (await plain.result()).status == "resolved"
        assert (await plain.describe()).parent_id is None
        with pytest.raises(RPCError):
            await client.get_workflow_handle(shadow_workflow_id(plain.id)).describe()
    assert "shadow mode off (never" not in keel("status").output
    assert "off since" in keel("status").output


def test_no_ledger_file_means_no_shadow_and_no_file(settings: KeelSettings) -> None:
    path = settings.home / "keel.db"
    assert tickets.shadow_config(settings) is None
    assert not path.exists() and not path.parent.exists()


def test_fraction_zero_config_shadows_nothing(shadow_db: Engine, settings: KeelSettings) -> None:
    from activities.shadow import start_shadow

    settings = settings.model_copy(update={"database_url": str(shadow_db.url)})
    start_shadow(shadow_db, CandidateSpec.parse("prompt=v2"), 0.0)
    tickets.forget_shadow_config()
    config = tickets.shadow_config(settings)
    assert config is not None and config.fraction == 0.0
    assert not any(is_shadowed(f"TK-{uuid.uuid4().hex}", config.fraction) for _ in range(1000))
