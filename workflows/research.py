"""ResearchReportWorkflow: the orchestrator pattern (research and synthesize).

The parent plans (its own model call), runs the retrieval and analysis sub-tasks as child agents in
parallel, each with its narrow tool set, model tier and budget (keel.research.ROLE_POLICIES), then a
writing child over their findings, then synthesizes the report (its own call) and publishes it.

Its budget bounds the whole family: a child's caps are reserved from it before the child starts (a child
that does not fit is not started) and the child's real usage is charged when it ends, failed attempts
included (workflows.children). A failed child is retried alone, as a new workflow; its siblings never run
again. A child that fails for good, is not started or is stopped by its budget does not fail the task: the
report says what is missing and the status is `partial`. The parent's own budget stopping it ends the task
with what it has (`budget_exceeded`), published all the same.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from keel import names
    from keel.policy import budget_for
    from keel.research import (
        OUTCOME_STATUS,
        PARENT_MAX_OUTPUT_TOKENS,
        TASK_TYPE,
        ResearchInput,
        ResearchPlan,
        ResearchResult,
        ResearchStatus,
        Subtask,
        child_input,
        choose_plan,
        default_plan,
        default_title,
        delivered,
        fallback_report,
        findings_context,
        missing_reason,
        question_problems,
        research_status,
    )
    from keel.types import AgentTaskResult, ChildRecord, Message

from workflows.budget import BudgetExceeded
from workflows.children import Children, PatternParent, failure_reason, parent_runner, usage_of

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)
SA_BUDGET = SearchAttributeKey.for_keyword(names.SA_BUDGET)


@workflow.defn(name=names.RESEARCH_REPORT_WORKFLOW)
class ResearchReportWorkflow(PatternParent):
    @workflow.run
    async def run(self, inp: ResearchInput) -> ResearchResult:
        wid = workflow.info().workflow_id
        problems = question_problems(inp.question)
        if problems:
            self._status, self._phase = "rejected", "done"
            result = ResearchResult(workflow_id=wid, question=inp.question, status="rejected",
                                    reason="; ".join(problems))
            workflow.upsert_search_attributes([SA_STATUS.value_set("rejected")])
            return result

        runner = parent_runner(TASK_TYPE, inp.feature, inp.budget or budget_for(TASK_TYPE), inp.large_model,
                               inp.sim, customer=inp.customer, prompt_version=inp.prompt_version)
        runner.max_output_tokens = PARENT_MAX_OUTPUT_TOKENS
        children = Children(runner, inp.max_child_attempts)
        self._children = children
        stopped = ""  # why the parent's own budget stopped it (empty while it has not)

        # 1. Plan: the parent's own call. An unusable plan (or a failed call) falls back on the default plan.
        self._phase = "plan"
        plan: ResearchPlan | None = None
        plan_source: Literal["model", "default", "none"] = "none"
        try:
            ask = [Message(role="user", content=f"Question: {inp.question}")]
            resp = await runner.llm("plan", "research/plan", ask, json_output=True)
            plan, problem = choose_plan(resp.text, inp.question)
            plan_source = "default" if problem else "model"
            if problem:
                runner.decide("default_plan", f"{problem}; using the default plan")
        except BudgetExceeded as e:
            stopped = str(e)
            runner.decide("kill", f"the parent's budget does not allow the plan call: {e}")
        except ActivityError as e:
            plan, plan_source = default_plan(inp.question), "default"
            runner.decide("default_plan", f"the plan call failed ({failure_reason(e)}); using the default plan")

        title = plan.title if plan is not None and plan.title else default_title(inp.question)
        outputs: dict[str, str] = {}
        sections: list[str] = []
        missing: list[str] = []
        delivered_count = 0
        report = ""
        if plan is not None:
            # 2. Retrieval and analysis children in parallel; 3. the writer over their findings.
            self._phase = "research"
            gatherers = plan.of_role("retrieval", "analysis")
            results = await asyncio.gather(*(children.run(child_input(s, inp, wid, [])) for s in gatherers))
            outputs.update(self._outputs(gatherers, results))
            context = [findings_context(s, outputs[s.name], self._record(s)) for s in gatherers]

            self._phase = "writing"
            writer = plan.of_role("writing")[0]
            written = await children.run(child_input(writer, inp, wid, context))
            outputs.update(self._outputs([writer], [written]))

            for s in plan.subtasks:
                rec, out = self._record(s), outputs[s.name]
                if delivered(rec, out):
                    delivered_count += 1
                else:
                    missing.append(missing_reason(rec, out))
            sections = [findings_context(s, outputs[s.name], self._record(s)) for s in [writer, *gatherers]]

            # 4. Synthesis: the parent's own call over everything the children delivered.
            self._phase = "synthesize"
            messages = [Message(role="user", content=f"Question: {inp.question}"),
                        Message(role="user", content=f"Title: {title}"),
                        *(Message(role="user", content=f"Context: {c}") for c in sections)]
            try:
                resp = await runner.llm("synthesize", "research/synthesize", messages)
                report = resp.text.strip()
                if not report:
                    runner.decide("fallback", "the synthesis was empty; publishing the children's findings")
            except BudgetExceeded as e:
                stopped = str(e)
                runner.decide("kill", f"the parent's budget does not allow the synthesis: {e}")
            except ActivityError as e:
                runner.decide("fallback", f"the synthesis call failed ({failure_reason(e)}); publishing the findings")

        status: ResearchStatus = research_status(delivered_count, missing, bool(stopped))
        if not report:
            why = (f"the parent's budget ran out ({stopped})" if stopped
                   else "no synthesis" if plan is not None else "no plan")
            report = fallback_report(inp.question, title, [s for s in sections if not s.startswith("Missing:")],
                                     missing, why)
        reason = stopped or ("missing: " + "; ".join(missing) if missing else "")

        # 5. Publish: one tool call stores the report and writes the parent's outcome row (family totals).
        self._phase = "publish"
        published = await children.publish("research_report", title, report, status=OUTCOME_STATUS[status],
                                           reason=reason[:1000])
        self._status, self._phase = status, "done"
        total = children.total()
        result = ResearchResult(
            workflow_id=wid, question=inp.question, status=status, reason=reason, title=title, report=report,
            report_id=str(published.content.get("report_id")) if published.ok else None, plan=plan,
            plan_source=plan_source, children=children.records, missing=missing, usage=total,
            own_usage=usage_of(runner), budget=runner.budget.report(), decisions=runner.decisions,
        )
        updates: list[SearchAttributeUpdate[Any]] = [
            SA_STATUS.value_set(status), SA_TOKENS.value_set(total.tokens), SA_COST.value_set(total.cost_usd),
            SA_BUDGET.value_set(f"limit:{result.budget.limit_hit}" if result.budget.limit_hit else result.budget.state),
        ]
        workflow.upsert_search_attributes(updates)
        return result

    def _record(self, sub: Subtask) -> ChildRecord:
        assert self._children is not None
        return next(r for r in self._children.records if r.name == sub.name)

    @staticmethod
    def _outputs(subs: list[Subtask], results: list[AgentTaskResult | None]) -> dict[str, str]:
        return {s.name: (r.output if r is not None else "") for s, r in zip(subs, results, strict=True)}

