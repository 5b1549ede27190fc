"""SupervisorWorkflow (`KeelSupervisor`): the supervisor pattern over any registered agents.

Each round a worker agent answers as a `KeelAgent` child (`worker-<round>`); its answer is checked
against the rules (keel.supervision, pure code here in the workflow), and only an answer that keeps
every rule is given to the reviewer agent, a child (`reviewer-<round>`) whose structured answer is a
`Review`. An answer that breaks a rule or is not approved goes back to the worker as a new child with
the violations and issues as context, up to `max_rounds`; then the supervision is escalated with them.

The parent's budget bounds the family: each child's caps are reserved from what is left before it
starts (shrunk when its agent's own caps do not fit; not started below MIN_CHILD_TOKENS) and its real
usage is charged when it ends (workflows.children). A worker or reviewer that is not registered, or a
reviewer whose answer is not a Review, is refused before any child starts. The parent's outcome row
carries the family's totals, and a result that is not complete goes to the human queue with its reason.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from keel import errors, names, registry
    from keel.agent import Agent, FinalOutput
    from keel.supervision import (
        CheckFn,
        Review,
        SupervisionRound,
        SupervisorInput,
        SupervisorResult,
        SupervisorStatus,
        check_names,
        violations,
    )
    from keel.types import AgentInput, AgentResult, ChildRecord, ModelSpec, TaskStatus

from workflows.agent import config_error
from workflows.children import Children, PatternParent, finish_parent, parent_runner, stage_caps, with_books

_OUTCOME: dict[SupervisorStatus, TaskStatus] = {
    "completed": "resolved", "escalated": "escalated", "budget_exceeded": "budget_exceeded", "rejected": "rejected",
}


@workflow.defn(name=names.SUPERVISOR_WORKFLOW, failure_exception_types=[errors.KeelError])
class SupervisorWorkflow(PatternParent):
    @workflow.run
    async def run(self, inp: SupervisorInput) -> SupervisorResult:
        wid = workflow.info().workflow_id
        runner = parent_runner(inp.name, inp.feature or inp.name, inp.budget, ModelSpec(), inp.sim,
                               tenant=inp.tenant, key=inp.key, heartbeat_timeout_s=inp.llm_heartbeat_timeout_s)
        self._children = children = Children(runner, inp.max_child_attempts)
        result = SupervisorResult(workflow_id=wid, status="completed")

        problems = self._problems(inp)
        if problems:
            return await self._end(children, result, "rejected", "the supervision cannot run: " + "; ".join(problems))

        last: SupervisionRound | None = None
        for n in range(1, inp.max_rounds + 1):
            rnd = SupervisionRound(round=n, worker=f"worker-{n}")
            result.rounds.append(rnd)

            # 1. The worker answers; from round 2 with its last answer and why it was sent back.
            self._phase = f"round {n}: worker"
            context = [] if last is None else [
                f"Your previous answer (round {last.round}): {last.answer}",
                "It was sent back; fix every point and answer again: " + "; ".join(last.reasons)]
            res = await self._child(children, inp, rnd.worker, "worker", inp.worker, inp.input, context)
            if res is None:
                return await self._end(children, result, self._not_run_status(children, rnd.worker),
                                       f"round {n}: the worker did not run to its end: "
                                       f"{self._why(children, rnd.worker)}")
            result.results[rnd.worker] = res
            rnd.worker_status = res.status
            if res.status != "completed":
                status: SupervisorStatus = "budget_exceeded" if res.status == "budget_exceeded" else "escalated"
                return await self._end(children, result, status, f"round {n}: the worker ended {res.status}: "
                                                                 f"{res.reason}")
            rnd.answer, rnd.structured = res.output, res.structured

            # 2. The rules (deterministic); an answer that breaks one is not worth a review.
            rnd.violations = self._violations(inp, res)
            if rnd.violations:
                runner.decide("rule_violation", f"round {n}: " + "; ".join(rnd.violations))
            elif inp.reviewer:
                # 3. The reviewer agent, with the worker's answer as its context.
                self._phase = f"round {n}: review"
                rnd.reviewer = f"reviewer-{n}"
                reviewed = await self._child(children, inp, rnd.reviewer, "reviewer", inp.reviewer,
                                             f"Review the answer to this request: {inp.input}",
                                             [f"The answer to review: {res.output}"])
                if reviewed is None:
                    return await self._end(children, result, self._not_run_status(children, rnd.reviewer),
                                           f"round {n}: the reviewer did not run to its end: "
                                           f"{self._why(children, rnd.reviewer)}")
                result.results[rnd.reviewer] = reviewed
                review, why = self._review_of(reviewed)
                if review is None:
                    status = "budget_exceeded" if reviewed.status == "budget_exceeded" else "escalated"
                    return await self._end(children, result, status, f"round {n}: {why}")
                rnd.review = review
                if not review.approved:
                    runner.decide("review_rejected", f"round {n}: " + "; ".join(rnd.reasons))

            if not rnd.reasons:
                rnd.accepted = True
                result.output, result.structured = res.output, res.structured
                how = "kept every rule" + (" and was approved by the reviewer" if inp.reviewer else "")
                return await self._end(children, result, "completed", f"round {n}: the worker's answer {how}")
            last = rnd
            if n < inp.max_rounds:
                runner.decide("send_back", f"round {n}: the answer goes back to the worker")

        assert last is not None
        return await self._end(children, result, "escalated",
                               f"no answer was accepted in {inp.max_rounds} round(s); last round: "
                               + "; ".join(last.reasons))

    @staticmethod
    def _problems(inp: SupervisorInput) -> list[str]:
        """Why the supervision cannot run, found before any child starts."""
        problems: list[str] = []
        worker = registry.find(inp.worker)
        if worker is None:
            problems.append(f"no worker agent {inp.worker!r} is registered on this worker")
        else:
            missing = [n for n in check_names(inp.rules) if n not in worker.checks]
            if missing:
                problems.append(f"the worker agent {inp.worker!r} declares no check {', '.join(map(repr, missing))} "
                                f"(its checks: {sorted(worker.checks) or 'none'})")
        if inp.reviewer:
            reviewer = registry.find(inp.reviewer)
            if reviewer is None:
                problems.append(f"no reviewer agent {inp.reviewer!r} is registered on this worker")
            elif reviewer.output_type is None or "approved" not in reviewer.output_type.model_fields:
                problems.append(f"the reviewer agent {inp.reviewer!r} must answer a keel.supervision.Review "
                                "(its output_type)")
        return problems

    @staticmethod
    def _violations(inp: SupervisorInput, res: AgentResult) -> list[str]:
        """The rules the worker's answer breaks; a `check` rule runs the worker agent's named check."""
        worker = registry.get(inp.worker)
        names_ = check_names(inp.rules)
        checks = {n: _adapt(worker, inp, n) for n in names_}
        try:
            return violations(inp.rules, res.output, res.structured, checks)
        except Exception as e:
            # A bug in the agent's check, met in workflow code: fail with it (a retried workflow task
            # would only raise it again, forever).
            raise config_error(f"agent {worker.name!r}: a check of the supervision's rules raised "
                               f"{type(e).__name__}: {e}") from e

    async def _child(self, children: Children, inp: SupervisorInput, name: str, role: str, agent: str, text: str,
                     context: list[str]) -> AgentResult | None:
        """Run one agent as a child with its caps out of what is left of the parent's budget. None when
        it was not started or failed for good (its record says why)."""
        wanted, fitted, problem = stage_caps(children, [registry.get(agent).budget])[0]
        if problem:
            children.runner.decide("skip_child", f"{name}: {problem}")
            children.records.append(ChildRecord(name=name, role=role, model=agent, status="not_started",
                                                reason=problem, budget_tokens=wanted.max_tokens,
                                                budget_usd=wanted.max_usd))
            return None
        if fitted != wanted:
            children.runner.decide("shrink_child", f"{name}: its agent's caps do not fit what is left; given "
                                                   f"{fitted.max_tokens} tokens, ${fitted.max_usd}")
        child = AgentInput(agent=agent, input=text, context=context, key=inp.key, tenant=inp.tenant,
                           feature=inp.feature or inp.name, budget=fitted, approval_mode=inp.approval_mode, sim=inp.sim,
                           models=inp.models, prices=inp.prices,
                           llm_heartbeat_timeout_s=inp.llm_heartbeat_timeout_s)
        return await children.run_agent(name, role, child)

    @staticmethod
    def _why(children: Children, name: str) -> str:
        rec = next((r for r in reversed(children.records) if r.name == name), None)
        return f"{rec.status}: {rec.reason}" if rec is not None else "did not run"

    @staticmethod
    def _not_run_status(children: Children, name: str) -> SupervisorStatus:
        """A child not started for want of budget leaves the supervision budget_exceeded; one that
        failed for good, escalated."""
        rec = next((r for r in reversed(children.records) if r.name == name), None)
        starved = rec is not None and rec.status == "not_started"
        return "budget_exceeded" if starved or children.runner.budget.limit_hit else "escalated"

    @staticmethod
    def _review_of(reviewed: AgentResult) -> tuple[Review | None, str]:
        if reviewed.status != "completed":
            return None, f"the reviewer ended {reviewed.status}: {reviewed.reason}"
        try:
            return Review.model_validate(reviewed.structured or {}), ""
        except ValidationError as e:
            return None, f"the reviewer's answer is not a Review ({e.error_count()} errors: {e.errors()[0]['msg']})"

    async def _end(self, children: Children, result: SupervisorResult, status: SupervisorStatus,
                   reason: str) -> SupervisorResult:
        self._phase, self._status = "done", status
        await finish_parent(children, status, _OUTCOME[status], reason)
        return with_books(children, result.model_copy(update={"status": status, "reason": reason}))


def _adapt(agent: Agent, inp: SupervisorInput, name: str) -> CheckFn:
    """The agent's check `name` as the rules run it: given the answer as a FinalOutput (its structured
    answer as the agent's output_type; no executed calls: the supervisor sees the answer only)."""
    fn = agent.checks[name]

    def run(text: str, structured: dict[str, object] | None) -> object:
        model = agent.output_type.model_validate(structured) if agent.output_type and structured is not None else None
        return fn(FinalOutput(text=text, structured=model, input=inp.input, tenant=inp.tenant, executed=()))

    return run  # type: ignore[return-value]
