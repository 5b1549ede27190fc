"""Starting support-ticket tasks and reading their results, through the Temporal client."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import Engine, make_url
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError, RPCStatusCode

from activities.prompts import PROMPTS_DIR
from keel import names
from keel.policy import APPROVALS, BUDGETS, budget_for, ticket_problems
from keel.pricing import UnpricedModelError, price_for
from keel.settings import KeelSettings, parse_approvers
from keel.shadow import (
    SHADOW_FEATURE,
    CandidateSpec,
    ShadowComparison,
    ShadowConfig,
    ShadowInput,
    is_shadowed,
    shadow_workflow_id,
)
from keel.types import ApprovalPolicy, ModelSpec, Progress, SimConfig, TicketInput, TicketResult
from workflows.ticket_pipeline import AGENT_PROMPT, CLASSIFY_PROMPT, DRAFT_PROMPT

SA_CUSTOMER = SearchAttributeKey.for_keyword(names.SA_CUSTOMER)
SA_TASK_TYPE = SearchAttributeKey.for_keyword(names.SA_TASK_TYPE)
SA_FEATURE = SearchAttributeKey.for_keyword(names.SA_FEATURE)
SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_AWAITING = SearchAttributeKey.for_bool(names.SA_AWAITING_APPROVAL)


class TicketInputError(ValueError):
    """A ticket (or a batch file) that cannot be submitted; the message says why and where."""


_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
PIPELINE_PROMPTS = (CLASSIFY_PROMPT, AGENT_PROMPT, DRAFT_PROMPT)
"""Every prompt a support ticket uses: a prompt version must have all of them."""


def prompt_version_problems(version: str) -> list[str]:
    """Why `version` cannot serve the ticket pipeline (a malformed name, missing prompt files), or []."""
    if not _VERSION.match(version):
        return [f"prompt version {version!r} must be 1-32 letters, digits or _.- (e.g. v2)"]
    missing = [f"{name}.{version}.md" for name in PIPELINE_PROMPTS
               if not (PROMPTS_DIR / f"{name}.{version}.md").is_file()]
    if missing:
        return [f"prompt version {version!r} is incomplete: missing {', '.join(missing)} under {PROMPTS_DIR}"]
    return []


def make_input(
    settings: KeelSettings,
    customer_id: str,
    text: str,
    ticket_id: str | None = None,
    sim: SimConfig | None = None,
    feature: str = "support",
    task_type: str = "support_ticket",
    prompt_version: str = "v1",
) -> TicketInput:
    """A validated ticket: text within limits, chargeback tags present and well formed, every model
    priced (an unpriced model is refused here, never counted as $0), every prompt of the pipeline
    present in `prompt_version`."""
    problems = ticket_problems(customer_id, text)
    problems += prompt_version_problems(prompt_version)
    for name, tag in (("customer id", customer_id.strip()), ("feature", feature), ("task type", task_type)):
        if tag and not _TAG.match(tag):
            problems.append(f"{name} {tag!r} must be 1-64 letters, digits or _.:- (it tags the ledger)")
    if not feature:
        problems.append("feature is empty (it tags the ledger)")
    if task_type not in BUDGETS:
        problems.append(f"unknown task type {task_type!r}; known: {sorted(BUDGETS)}")
    small, large = ModelSpec.parse(settings.model_small), ModelSpec.parse(settings.model_large)
    for spec in (small, large):
        try:
            price_for(spec.provider, spec.model)
        except UnpricedModelError as e:
            problems.append(str(e))
    if problems:
        raise TicketInputError("; ".join(problems))
    return TicketInput(
        ticket_id=ticket_id or f"TK-{uuid.uuid4().hex[:10]}",
        customer_id=customer_id.strip(),
        text=text,
        feature=feature,
        task_type=task_type,
        prompt_version=prompt_version,
        # Pinned in the input (and so in the history): a later change of the policy's default must
        # not change how an already-started task replays.
        budget=budget_for(task_type),
        pipeline_version=names.PIPELINE_VERSION,
        small_model=small,
        large_model=large,
        sim=sim or SimConfig(seed=settings.sim_seed, spiral_rate=settings.sim_spiral_rate),
        approval=approval_policy(settings),
        hold_for_human=settings.hold_escalated,
    )


def approval_policy(settings: KeelSettings) -> ApprovalPolicy:
    """The policy's approvers (or KEEL_APPROVERS), timeout and mode, to pin into a task's input."""
    approvers = parse_approvers(settings.approvers) if settings.approvers else APPROVALS.approvers
    return ApprovalPolicy(approvers=approvers, timeout_s=settings.approval_timeout_s, mode=settings.approval_mode)


def workflow_id_for(inp: TicketInput) -> str:
    # Unique per run: the ledger and write idempotency are keyed on the workflow id, so a ticket
    # submitted twice must not share one.
    return f"ticket-{inp.ticket_id}-{uuid.uuid4().hex[:8]}"


def ticket_summary(inp: TicketInput) -> str:
    """What the Temporal UI lists for the workflow: no ticket text (summaries are not search
    attributes, but keep them free of PII anyway), and the models, labelled."""
    models = inp.large_model.label if not inp.tiering else f"{inp.small_model.label} / {inp.large_model.label}"
    return f"Support ticket {inp.ticket_id} · customer {inp.customer_id} · {models}"


async def start_ticket(client: Client, settings: KeelSettings, inp: TicketInput) -> WorkflowHandle[Any, TicketResult]:
    shadow = None if inp.dry_run else shadow_config(settings)
    if shadow is not None and is_shadowed(inp.ticket_id, shadow.fraction):
        return await start_shadowed(client, settings, inp, shadow.candidate)
    return await client.start_workflow(
        names.SUPPORT_TICKET_WORKFLOW,
        inp,
        id=workflow_id_for(inp),
        task_queue=settings.task_queue,
        result_type=TicketResult,
        static_summary=ticket_summary(inp),
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SA_CUSTOMER, inp.customer_id),
                SearchAttributePair(SA_TASK_TYPE, inp.task_type),
                SearchAttributePair(SA_FEATURE, inp.feature),
                SearchAttributePair(SA_STATUS, "running"),
                SearchAttributePair(SA_AWAITING, False),
            ]
        ),
    )


# --- shadow mode (`keel shadow start`) ----------------------------------------------------------

SHADOW_CONFIG_CACHE_S = 2.0
"""A process reuses its read of the shadow configuration this long: a batch reads it once or twice, and
`keel shadow start/stop` reaches running submitters within this time."""
SHADOW_START_TIMEOUT_S = 60.0
_shadow_configs: dict[str, tuple[float, ShadowConfig | None]] = {}


class ShadowStartError(RuntimeError):
    """A shadowed ticket whose primary workflow did not appear in time (is a worker running?)."""


@functools.cache
def _ledger_engine(url: str) -> Engine:
    from activities.db import make_engine

    return make_engine(url)


def _read_shadow_config(url: str) -> ShadowConfig | None:
    from activities.shadow import active_shadow

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and (not u.database or not Path(u.database).expanduser().is_file()):
        return None  # no ledger file yet (nothing ran here): no shadow, and no file is created for asking
    return active_shadow(_ledger_engine(url))


def shadow_config(settings: KeelSettings) -> ShadowConfig | None:
    """The active shadow configuration of the ledger in `settings`, or None (cached per process for
    SHADOW_CONFIG_CACHE_S)."""
    url, now = settings.db_url, time.monotonic()
    hit = _shadow_configs.get(url)
    if hit is not None and now - hit[0] < SHADOW_CONFIG_CACHE_S:
        return hit[1]
    config = _read_shadow_config(url)
    _shadow_configs[url] = (now, config)
    return config


def forget_shadow_config() -> None:
    """Drop the cached configuration (after `keel shadow start/stop` in this process)."""
    _shadow_configs.clear()


async def start_shadowed(
    client: Client, settings: KeelSettings, inp: TicketInput, candidate: CandidateSpec,
    timeout_s: float = SHADOW_START_TIMEOUT_S,
) -> WorkflowHandle[Any, TicketResult]:
    """Start the ticket as a ShadowWorkflow (`shadow-<primary id>`) whose primary child has the ticket's
    normal workflow id, and return a handle to that PRIMARY once it exists: results, progress,
    approvals and `settled()` work on it as on any ticket."""
    primary_id = workflow_id_for(inp)
    await client.start_workflow(
        names.SHADOW_WORKFLOW,
        ShadowInput(primary=inp, candidate=candidate, primary_workflow_id=primary_id),
        id=shadow_workflow_id(primary_id),
        task_queue=settings.task_queue,
        result_type=ShadowComparison,
        static_summary=f"Shadow of ticket {inp.ticket_id} · candidate {candidate.label}",
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(SA_CUSTOMER, inp.customer_id),
            SearchAttributePair(SA_TASK_TYPE, inp.task_type),
            SearchAttributePair(SA_FEATURE, SHADOW_FEATURE),
            SearchAttributePair(SA_STATUS, "running"),
        ]),
    )
    handle: WorkflowHandle[Any, TicketResult] = client.get_workflow_handle(primary_id, result_type=TicketResult)
    deadline, pause = time.monotonic() + timeout_s, 0.02
    while True:
        try:
            await handle.describe()
            return handle
        except RPCError as e:
            if e.status != RPCStatusCode.NOT_FOUND:
                raise
        if time.monotonic() > deadline:
            raise ShadowStartError(
                f"shadow workflow {shadow_workflow_id(primary_id)} has not started ticket {primary_id} within "
                f"{timeout_s:.0f}s: is a worker polling task queue {settings.task_queue!r}? It starts when one is.")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.25)


async def progress(client: Client, workflow_id: str) -> Progress:
    handle = client.get_workflow_handle(workflow_id)
    p: Progress = await handle.query(names.PROGRESS_QUERY, result_type=Progress)
    return p


async def result(client: Client, workflow_id: str) -> TicketResult:
    handle = client.get_workflow_handle(workflow_id, result_type=TicketResult)
    r: TicketResult = await handle.result()
    return r


def load_batch_file(path: Path, settings: KeelSettings, sim: SimConfig | None = None, prompt_version: str = "v1"
                    ) -> list[TicketInput]:
    """A JSON list or JSON Lines of {"customer_id", "text", optional "ticket_id"}. Every problem in
    the file is reported (with its line or index) and nothing is started if there is any."""
    if bad_version := prompt_version_problems(prompt_version):
        raise TicketInputError("; ".join(bad_version))
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TicketInputError(f"{path}: cannot read: {e}") from e
    entries: list[tuple[str, Any]] = []
    stripped = raw.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TicketInputError(f"{path}: not valid JSON: {e}") from e
        entries = [(f"item {i}", it) for i, it in enumerate(items)]
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                entries.append((f"line {n}", e))
    if not entries:
        raise TicketInputError(f"{path}: no tickets in the file")
    problems, inputs = [], []
    for where, item in entries:
        if isinstance(item, json.JSONDecodeError):
            problems.append(f"{where}: not valid JSON ({item.msg})")
            continue
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an object with customer_id and text, got {type(item).__name__}")
            continue
        unknown = set(item) - {"customer_id", "text", "ticket_id", "feature"}
        if unknown:
            problems.append(f"{where}: unknown fields {sorted(unknown)}")
            continue
        try:
            inputs.append(make_input(settings, str(item.get("customer_id", "")), str(item.get("text", "")),
                                     item.get("ticket_id"), sim, str(item.get("feature", "support")),
                                     prompt_version=prompt_version))
        except (TicketInputError, ValidationError) as e:
            problems.append(f"{where}: {e}")
    if problems:
        listing = "\n  ".join(problems)
        raise TicketInputError(f"{path}: {len(problems)} bad ticket(s), nothing was started:\n  {listing}")
    return inputs


WAITING_FOR_PEOPLE = ("awaiting_approval", "awaiting_human")


async def settled(
    client: Client, handle: WorkflowHandle[Any, TicketResult], inp: TicketInput, poll_s: float = 0.25
) -> TicketResult:
    """The ticket's result, or, as soon as it waits for a person (an approval, a human resolution),
    a result that says so: a batch does not sit for a day behind a refund awaiting approval."""
    result = asyncio.ensure_future(handle.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=poll_s)
            if done:
                return result.result()
            p = await progress(client, handle.id)
            if p.status in WAITING_FOR_PEOPLE:
                return waiting_result(handle.id, inp, p)
    finally:
        if not result.done():
            result.cancel()


def waiting_result(workflow_id: str, inp: TicketInput, p: Progress) -> TicketResult:
    if p.status == "awaiting_approval" and p.pending_action is not None:
        a = p.pending_action
        reason = f"{a.tool} {json.dumps(a.arguments, sort_keys=True)} awaits approval ({a.action_id})"
    else:
        reason = "escalated; waiting for a human to resolve it"
    return TicketResult(workflow_id=workflow_id, ticket_id=inp.ticket_id, customer_id=inp.customer_id,
                        status=p.status, route="human", reason=reason, category=p.category,
                        tools_executed=p.tools_executed, steps=p.step, llm_calls=p.llm_calls, tokens=p.tokens,
                        cost_usd=p.cost_usd)


async def run_batch(
    client: Client,
    settings: KeelSettings,
    inputs: list[TicketInput],
    concurrency: int,
    on_done: Callable[[TicketResult], Awaitable[None] | None] | None = None,
) -> list[TicketResult]:
    """Start every ticket (at most `concurrency` in flight) and collect the results in input order."""
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(inp: TicketInput) -> TicketResult:
        async with sem:
            handle = await start_ticket(client, settings, inp)
            res = await settled(client, handle, inp)
        if on_done is not None:
            maybe = on_done(res)
            if maybe is not None:
                await maybe
        return res

    return list(await asyncio.gather(*(one(i) for i in inputs)))
