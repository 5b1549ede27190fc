"""OrchestratorWorkflow (`KeelOrchestrator`): the orchestrator pattern over any registered agents.

The plan is given or made by a planner agent (a child whose structured answer is a `keel.Plan`); its
tasks run as `KeelAgent` children in stages (parallel within a stage, a task's `after` answers as its
context), then an optional synthesizer agent writes the answer from theirs. Every child is a full agent
task of its own (budget, approvals, guardrails, output checks, ledger rows tagged with this parent).

The parent's budget bounds the family: before a child starts its caps are reserved from what is left
(shrunk to its share of the stage when its agent's own caps do not fit; not started below
MIN_CHILD_TOKENS), and its real usage is charged when it ends (workflows.children). A child that does
not complete leaves the orchestration `partial` with the reason in `missing`; a plan that cannot run
(unknown agent, cycle) is refused before any child starts. The parent's outcome row carries the family's
totals, and a result that is not complete goes to the human queue with its reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from keel import names, registry
    from keel.orchestration import (
        ChildTask,
        OrchestratorInput,
        OrchestratorResult,
        OrchestratorStatus,
        Plan,
        named,
        plan_problems,
        stages,
    )
    from keel.types import AgentInput, AgentResult, Budget, ChildRecord, FinishRequest, ModelSpec, TaskStatus

from workflows.agent_loop import FINISH_RETRY
from workflows.children import Children, PatternParent, parent_runner, stage_caps

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)
SA_BUDGET = SearchAttributeKey.for_keyword(names.SA_BUDGET)

_OUTCOME: dict[OrchestratorStatus, TaskStatus] = {
    "completed": "resolved", "partial": "escalated", "escalated": "escalated", "budget_exceeded": "budget_exceeded",
    "rejected": "rejected",
}


@workflow.defn(name=names.ORCHESTRATOR_WORKFLOW)
class OrchestratorWorkflow(PatternParent):
    @workflow.run
    async def run(self, inp: OrchestratorInput) -> OrchestratorResult:
        wid = workflow.info().workflow_id
        runner = parent_runner(inp.name, inp.feature or inp.name, inp.budget, ModelSpec(), inp.sim,
                               customer=inp.tenant, key=inp.key)
        self._children = children = Children(runner, inp.max_child_attempts)
        result = OrchestratorResult(workflow_id=wid, status="completed")
        known = {a.name for a in registry.registered()}

        # 1. The plan: given, or the planner agent's structured answer.
        tasks = named(inp.tasks)
        result.plan_source = "given"
        if inp.planner:
            self._phase = "plan"
            result.plan_source = "planner"
            if inp.planner not in known:
                return await self._end(children, result, "rejected", f"no planner agent {inp.planner!r} is registered")
            planned = await self._child(children, inp, "planner", "planner", inp.planner, inp.input, [],
                                        stage_caps(children, [registry.get(inp.planner).budget])[0])
            tasks, why = self._plan_of(planned)
            if planned is not None:
                result.results["planner"] = planned
            if why:
                return await self._end(children, result, "escalated", f"the planner gave no usable plan: {why}")
        result.plan = tasks
        problems = plan_problems(tasks, known)
        if problems:
            return await self._end(children, result, "rejected", "the plan cannot run: " + "; ".join(problems))

        # 2. The tasks, stage by stage; each task's `after` answers are its context.
        self._phase = "tasks"
        answers: dict[str, str] = {}
        for stage in stages(tasks) or []:
            caps = stage_caps(children, [t.budget or registry.get(t.agent).budget for t in stage])
            ran = await asyncio.gather(*(
                self._child(children, inp, t.name, "task", t.agent, t.input,
                            [f"{a}: {answers[a]}" for a in t.after if a in answers], c)
                for t, c in zip(stage, caps, strict=True)))
            for t, res in zip(stage, ran, strict=True):
                if res is not None:
                    result.results[t.name] = res
                if res is not None and res.status == "completed":
                    answers[t.name] = res.output or str(res.structured)
                else:
                    result.missing.append(f"{t.name}: {self._why(children, t.name, res)}")

        # 3. The answer: the synthesizer's over the children's answers, or theirs under their names.
        sections = [f"{t.name} ({t.agent}): {answers[t.name]}" for t in tasks if t.name in answers]
        if inp.synthesizer and sections:
            self._phase = "synthesize"
            res = await self._child(children, inp, "synthesizer", "synthesizer", inp.synthesizer, inp.input,
                                    sections, stage_caps(children, [registry.get(inp.synthesizer).budget])[0])
            if res is not None:
                result.results["synthesizer"] = res
            if res is not None and res.status == "completed":
                result.output, result.structured = res.output, res.structured
            else:
                result.missing.append(f"synthesizer: {self._why(children, 'synthesizer', res)}")
        if not result.output:
            result.output = "\n\n".join(sections)

        if not answers:
            status: OrchestratorStatus = "budget_exceeded" if runner.budget.limit_hit else "escalated"
            return await self._end(children, result, status, "no task completed: " + "; ".join(result.missing))
        if result.missing:
            return await self._end(children, result, "partial", "missing: " + "; ".join(result.missing))
        return await self._end(children, result, "completed", f"{len(answers)} tasks completed")

    async def _child(self, children: Children, inp: OrchestratorInput, name: str, role: str, agent: str, text: str,
                     context: list[str], caps: tuple[Budget, Budget, str]) -> AgentResult | None:
        """Run one agent as a child with the caps it was given (see _stage_caps). None when it was not
        started or failed for good."""
        wanted, fitted, problem = caps
        if problem:
            children.runner.decide("skip_child", f"{name}: {problem}")
            children.records.append(ChildRecord(name=name, role=role, model=agent, status="not_started",
                                                reason=problem))
            return None
        if fitted != wanted:
            children.runner.decide("shrink_child", f"{name}: caps {_caps(wanted)} do not fit; given {_caps(fitted)}")
        child = AgentInput(agent=agent, input=text, context=context, key=inp.key, tenant=inp.tenant,
                           feature=inp.feature or inp.name, budget=fitted, approval_mode=inp.approval_mode, sim=inp.sim)
        return await children.run_agent(name, role, child)

    @staticmethod
    def _plan_of(planned: AgentResult | None) -> tuple[list[ChildTask], str]:
        if planned is None:
            return [], "the planner did not run to its end"
        if planned.status != "completed":
            return [], f"the planner ended {planned.status}: {planned.reason}"
        try:
            return named(Plan.model_validate(planned.structured or {}).tasks), ""
        except ValidationError as e:
            return [], f"its answer is not a keel.Plan ({e.error_count()} errors: {e.errors()[0]['msg']})"

    @staticmethod
    def _why(children: Children, name: str, res: AgentResult | None) -> str:
        if res is not None:
            return f"{res.status}: {res.reason}"
        rec = next((r for r in children.records if r.name == name), None)
        return f"{rec.status}: {rec.reason}" if rec is not None else "did not run"

    async def _end(self, children: Children, result: OrchestratorResult, status: OrchestratorStatus,
                   reason: str) -> OrchestratorResult:
        runner = children.runner
        self._phase, self._status = "done", status
        human = status != "completed"
        runner.decide("route", f"{'human' if human else 'reply'}: {reason}")
        outcome = children.outcome(_OUTCOME[status], "human" if human else "reply", reason[:1000])
        await workflow.execute_activity(
            names.FINISH_ACTIVITY,
            FinishRequest(task=runner.task, step=runner.progress.step + 1, outcome=outcome, decisions=runner.decisions,
                          human_reason=reason if human else None),
            result_type=str, start_to_close_timeout=names.TOOL_START_TO_CLOSE, retry_policy=FINISH_RETRY,
        )
        total = children.total()
        final = result.model_copy(update={"status": status, "reason": reason, "children": children.records,
                                          "usage": total, "budget": runner.budget.report(),
                                          "decisions": runner.decisions})
        updates: list[SearchAttributeUpdate[Any]] = [
            SA_STATUS.value_set(status), SA_TOKENS.value_set(total.tokens), SA_COST.value_set(total.cost_usd),
            SA_BUDGET.value_set(f"limit:{final.budget.limit_hit}" if final.budget.limit_hit else final.budget.state),
        ]
        workflow.upsert_search_attributes(updates)
        return final


def _caps(b: Budget) -> str:
    tokens = f"{b.max_tokens:,} tokens" if b.max_tokens is not None else "unlimited tokens"
    return tokens + (f", ${b.max_usd:.4f}" if b.max_usd is not None else ", unlimited dollars")
