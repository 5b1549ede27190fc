"""Running a pattern's child agents: budget reservation, real-usage accounting and retry of one child.

Before a child starts, its budget caps are reserved from the parent's (BudgetGuard.reserve), so
children running in parallel can never together spend more than the parent has left; a child that
does not fit is not started. When a child ends its reservation is released and what it really used
is charged, failed attempts included (their tokens were spent: the failure carries them, or the
ledger is asked). A failed child is retried alone, as a new workflow (`<parent>/<name>~2`), so its
ledger rows never overwrite the failed attempt's and the siblings are not run again.

Deterministic: every wait is a Temporal child workflow or activity.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributeKey,
    SearchAttributePair,
    SearchAttributeUpdate,
    TypedSearchAttributes,
)
from temporalio.exceptions import ApplicationError, ChildWorkflowError, FailureError

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, ValidationError

    from keel import names
    from keel.orchestration import MIN_CHILD_TOKENS
    from keel.policy import DEFAULT_TIERS
    from keel.types import (
        AgentInput,
        AgentResult,
        Budget,
        ChildRecord,
        ChildStatus,
        FinishRequest,
        ModelSpec,
        PatternProgress,
        Route,
        SimConfig,
        TaskContext,
        TaskOutcome,
        TaskStatus,
        TaskUsage,
    )

from workflows.agent_loop import FINISH_RETRY, AgentRunner, TemporalCalls
from workflows.budget import Reservation

TASK_USAGE_ACTIVITY = names.TASK_USAGE_ACTIVITY
"""Reads a task's usage from the ledger: for a child that failed without saying what it spent."""

CHILD_EXECUTION_TIMEOUT = timedelta(minutes=30)

R = TypeVar("R")

SA_CUSTOMER = SearchAttributeKey.for_keyword(names.SA_CUSTOMER)
SA_TASK_TYPE = SearchAttributeKey.for_keyword(names.SA_TASK_TYPE)
SA_FEATURE = SearchAttributeKey.for_keyword(names.SA_FEATURE)
SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_AWAITING = SearchAttributeKey.for_bool(names.SA_AWAITING_APPROVAL)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)
SA_BUDGET = SearchAttributeKey.for_keyword(names.SA_BUDGET)


def parent_runner(task_type: str, feature: str, budget: Budget, model: ModelSpec, sim: SimConfig,
                  tenant: str = "internal", key: str = "", prompt_version: str = "v1",
                  heartbeat_timeout_s: float | None = None) -> AgentRunner:
    """The runner of a pattern's parent workflow: its own model calls (plan, review, synthesize) and
    the budget its children's reservations are held against. Call inside the workflow."""
    info = workflow.info()
    task = TaskContext(workflow_id=info.workflow_id, tenant=tenant, key=key or info.workflow_id,
                       feature=feature, task_type=task_type, prompt_version=prompt_version)
    runner = AgentRunner(TemporalCalls(heartbeat_timeout_s), task, models={"small": model, "large": model},
                         tiers=dict(DEFAULT_TIERS), sim=sim, budget=budget)
    runner.clock = workflow.now
    return runner


def failure_reason(e: BaseException) -> str:
    """The message of what failed: an activity's or child's error, not Temporal's wrapper around it."""
    return str(e.cause if isinstance(e, FailureError) and e.cause is not None else e)


def usage_of(runner: AgentRunner) -> TaskUsage:
    """A runner's own calls (a child's whole usage; a parent's own, without its children's)."""
    return TaskUsage(llm_calls=runner.llm_calls, input_tokens=runner.input_tokens,
                     output_tokens=runner.output_tokens, cost_usd=round(runner.cost_usd, 8))


class PatternParent:
    """What every pattern's parent workflow shares: its children's books and the `progress` query
    (its phase and each child's state), before the children exist too."""

    def __init__(self) -> None:
        self._children: Children | None = None
        self._status = "running"
        self._phase = "starting"

    @workflow.query(name=names.PROGRESS_QUERY)
    def progress(self) -> PatternProgress:
        if self._children is None:
            return PatternProgress(status=self._status, phase=self._phase)
        return self._children.progress(self._status, self._phase)


def child_id(parent_id: str, name: str, attempt: int) -> str:
    return f"{parent_id}/{name}" if attempt == 1 else f"{parent_id}/{name}~{attempt}"


class Children:
    """The children of one parent, and the parent's books over them."""

    def __init__(self, runner: AgentRunner, max_attempts: int = 3) -> None:
        self.runner = runner
        self.max_attempts = max_attempts
        self.records: list[ChildRecord] = []
        self.usage = TaskUsage()
        """All children's usage, every attempt."""

    @property
    def parent_id(self) -> str:
        return self.runner.task.workflow_id

    def total(self) -> TaskUsage:
        """The parent's own calls plus every child's."""
        return usage_of(self.runner).plus(self.usage)

    def outcome(self, status: TaskStatus, route: Route, reason: str, category: str | None = None) -> TaskOutcome:
        """The parent's outcome row: its totals are the whole family's (own calls plus every child's)."""
        o = self.runner.outcome(status, route, reason, {"category": category} if category else {})
        t = self.total()
        return o.model_copy(update={"llm_calls": t.llm_calls, "input_tokens": t.input_tokens,
                                    "output_tokens": t.output_tokens, "cost_usd": t.cost_usd})

    def progress(self, status: str, phase: str) -> PatternProgress:
        total = self.total()
        return PatternProgress(status=status, phase=phase, children=self.records, tokens=total.tokens,
                               cost_usd=total.cost_usd, budget=self.runner.budget.report())

    async def run_agent(self, name: str, role: str, inp: AgentInput) -> AgentResult | None:
        """Run one registered agent as a child (`KeelAgent`) to its end; None if it never completed.

        Its caps (`inp.budget`) are reserved from the parent's first. A failed child is retried alone
        unless its failure is final (an unknown agent, a configuration error)."""
        budget = inp.budget or Budget()
        rec = ChildRecord(name=name, role=role, model=inp.agent, budget_tokens=budget.max_tokens,
                          budget_usd=budget.max_usd)

        async def start(wid: str, attempt: int) -> tuple[AgentResult, TaskUsage, str, str]:
            res: AgentResult = await workflow.execute_child_workflow(
                names.AGENT_WORKFLOW, inp, id=wid, result_type=AgentResult,
                # No execution timeout: a child agent bounds itself (budget, step cap, approval timeout).
                retry_policy=RetryPolicy(maximum_attempts=1),
                static_summary=f"{role} {name}: agent {inp.agent}",
                search_attributes=TypedSearchAttributes([
                    SearchAttributePair(SA_CUSTOMER, inp.tenant), SearchAttributePair(SA_TASK_TYPE, inp.agent),
                    SearchAttributePair(SA_FEATURE, inp.feature or inp.agent),
                    SearchAttributePair(SA_STATUS, "running"), SearchAttributePair(SA_AWAITING, False)]),
            )
            usage = TaskUsage(llm_calls=res.llm_calls, input_tokens=res.input_tokens, output_tokens=res.output_tokens,
                              cost_usd=res.cost_usd)
            return res, usage, res.status, res.reason

        return await self._attempts(rec, budget, start, retry_all=False)

    async def _attempts(self, rec: ChildRecord, caps: Budget,
                        start: Callable[[str, int], Awaitable[tuple[R, TaskUsage, str, str]]],
                        retry_all: bool) -> R | None:
        self.records.append(rec)
        budget = self.runner.budget
        for attempt in range(1, self.max_attempts + 1):
            problem = budget.cannot_reserve(caps)
            if problem is not None:
                rec.status = "not_started" if attempt == 1 else "failed"
                rec.reason = problem
                self.runner.decide("skip_child", f"{rec.name}: {problem}")
                return None
            reservation = budget.reserve(caps)
            wid = child_id(self.parent_id, rec.name, attempt)
            rec.workflow_id, rec.attempts, rec.status = wid, attempt, "running"
            try:
                res, used, status, reason = await start(wid, attempt)
            except ChildWorkflowError as e:
                spent = await self._spent(wid, e)
                self._settle(rec, reservation, spent)
                why = failure_reason(e)
                rec.failures.append(why)
                rec.reason = why
                final = not retry_all and isinstance(e.cause, ApplicationError) and e.cause.non_retryable
                last = attempt == self.max_attempts or final
                self.runner.decide("child_failed", f"{wid}: {why}" + ("" if last else "; retrying this child alone"))
                if final:
                    break
                continue
            self._settle(rec, reservation, used)
            rec.status, rec.reason = cast(ChildStatus, status), reason
            return res
        rec.status = "failed"
        return None

    def _settle(self, rec: ChildRecord, reservation: Reservation, spent: TaskUsage) -> None:
        self.runner.budget.settle(reservation, spent.tokens, spent.cost_usd)
        rec.usage = rec.usage.plus(spent)
        self.usage = self.usage.plus(spent)

    async def _spent(self, wid: str, e: ChildWorkflowError) -> TaskUsage:
        cause = e.cause
        if isinstance(cause, ApplicationError) and cause.details:
            try:
                return TaskUsage.model_validate(cause.details[0])
            except ValidationError:
                pass
        # Timed out, terminated, or failed before it could say: the ledger has every call it made.
        usage: TaskUsage = await workflow.execute_activity(
            TASK_USAGE_ACTIVITY, wid, result_type=TaskUsage, start_to_close_timeout=timedelta(seconds=30),
        )
        return usage


async def finish_parent(children: Children, status: str, task_status: TaskStatus, reason: str) -> None:
    """A pattern parent's last step: its route decision; its outcome row with the family's totals and,
    unless it completed, its human-queue item with `reason` (the finish activity, written once); and its
    search attributes (status, family tokens and cost, budget state)."""
    runner = children.runner
    human = status != "completed"
    runner.decide("route", f"{'human' if human else 'reply'}: {reason}")
    outcome = children.outcome(task_status, "human" if human else "reply", reason[:1000])
    await workflow.execute_activity(
        names.FINISH_ACTIVITY,
        FinishRequest(task=runner.task, step=runner.progress.step + 1, outcome=outcome, decisions=runner.decisions,
                      human_reason=reason if human else None),
        result_type=str, start_to_close_timeout=names.TOOL_START_TO_CLOSE, retry_policy=FINISH_RETRY,
    )
    total, report = children.total(), runner.budget.report()
    updates: list[SearchAttributeUpdate[Any]] = [
        SA_STATUS.value_set(status), SA_TOKENS.value_set(total.tokens), SA_COST.value_set(total.cost_usd),
        SA_BUDGET.value_set(f"limit:{report.limit_hit}" if report.limit_hit else report.state),
    ]
    workflow.upsert_search_attributes(updates)


M = TypeVar("M", bound=BaseModel)


def with_books(children: Children, result: M) -> M:
    """A pattern's result with the family's books: its children, the usage of all of them over every
    attempt, the parent's budget report and decisions."""
    return result.model_copy(update={"children": children.records, "usage": children.total(),
                                     "budget": children.runner.budget.report(),
                                     "decisions": children.runner.decisions})


def stage_caps(children: Children, wanted: list[Budget]) -> list[tuple[Budget, Budget, str]]:
    """The caps of the children about to start together: their own when all of them fit what the parent
    has left, else each limit cut to an equal share of it. (wanted, given, why it cannot start)."""
    guard = children.runner.budget
    together = Budget(max_tokens=sum(b.max_tokens for b in wanted if b.max_tokens is not None)
                      if all(b.max_tokens is not None for b in wanted) else None,
                      max_usd=sum(b.max_usd for b in wanted if b.max_usd is not None)
                      if all(b.max_usd is not None for b in wanted) else None)
    if guard.cannot_reserve(together) is None:
        return [(b, b, "") for b in wanted]
    n = len(wanted)
    left_t, left_u = guard.budget.max_tokens, guard.budget.max_usd
    if left_t is not None:
        left_t = (left_t - guard.used_tokens - guard.reserved_tokens) // n
    if left_u is not None:
        left_u = (left_u - guard.used_usd - guard.reserved_usd) / n
    out: list[tuple[Budget, Budget, str]] = []
    for b in wanted:
        tokens, usd = _least(b.max_tokens, left_t), _least(b.max_usd, left_u)
        if tokens is not None and tokens < MIN_CHILD_TOKENS:
            out.append((b, b, f"what is left of the parent's budget ({max(tokens, 0):,} tokens for this child) "
                              f"is below the {MIN_CHILD_TOKENS} tokens a child needs to start"))
        elif usd is not None and usd <= 0:
            out.append((b, b, "the parent's dollar budget is spent"))
        else:
            out.append((b, b.model_copy(update={"max_tokens": tokens,
                                                "max_usd": round(usd, 8) if usd is not None else None}), ""))
    return out


N = TypeVar("N", int, float)


def _least(a: N | None, b: N | None) -> N | None:
    return b if a is None else a if b is None else min(a, b)
