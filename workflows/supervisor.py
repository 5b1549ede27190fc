"""SupervisedPlanWorkflow: the supervisor pattern, on disaster recovery.

Each round a worker child agent (AgentTaskWorkflow: prompt dr/plan, tools get_service_status and
lookup_runbook, its own model and budget) drafts a recovery plan as JSON. The supervisor parses it,
checks every step against the runbook's deterministic rules (keel.runbooks), then makes its own LLM
review call (step kind "review"). Accept: the plan is published (publish_report). Revise: the next
round's worker gets its previous plan and the feedback (rule violations and the reviewer's points).
After `max_rounds`, or when the reviewer escalates, the task goes to the human queue with the reasons.

The review overhead is kept apart: `review_usage` is the supervisor's own calls, `worker_usage` the
children's; together they are the ledger's family totals of this workflow.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

with workflow.unsafe.imports_passed_through():
    from keel import names
    from keel.policy import budget_for
    from keel.runbooks import SERVICES, check_plan, normalize_topic, rules_for
    from keel.supervisor import (
        TASK_TYPE,
        WORKER_BUDGET,
        Plan,
        RoundRecord,
        SupervisedPlanInput,
        SupervisedPlanResult,
        decide_round,
        feedback_context,
        input_problems,
        parse_plan,
        parse_verdict,
        plan_markdown,
        review_messages_text,
        worker_instructions,
    )
    from keel.tools import PLANNING_TOOLS
    from keel.types import AgentTaskInput, Message

from workflows.budget import BudgetExceeded
from workflows.children import Children, PatternParent, parent_runner, usage_of

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)

WORKER_MAX_OUTPUT_TOKENS = 1_600
"""A plan of a dozen steps with rollbacks and verifications is about 1,000 tokens of JSON."""


@workflow.defn(name=names.SUPERVISED_PLAN_WORKFLOW)
class SupervisedPlanWorkflow(PatternParent):
    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        workflow.set_current_details(f"supervisor · {phase}")

    @workflow.run
    async def run(self, inp: SupervisedPlanInput) -> SupervisedPlanResult:
        info = workflow.info()
        topic = normalize_topic(inp.runbook)
        result = SupervisedPlanResult(workflow_id=info.workflow_id, status="escalated", runbook=topic)
        problems = input_problems(inp)
        if problems:
            self._status, self._phase = "rejected", "rejected"
            result.status, result.reason = "rejected", "; ".join(problems)
            workflow.upsert_search_attributes([SA_STATUS.value_set("rejected")])
            return result
        runner = parent_runner(TASK_TYPE, inp.feature, inp.budget or budget_for(TASK_TYPE), inp.reviewer_model,
                               inp.sim, inp.customer, key=inp.key, prompt_version=inp.prompt_version)
        children = Children(runner, max_attempts=2)
        self._children = children
        rules = rules_for(topic)
        rule_ids = [r.id for r in rules]
        key = inp.key or info.workflow_id
        context: list[str] = []
        escalation: str | None = None
        accepted: Plan | None = None

        try:
            for round_no in range(1, inp.max_rounds + 1):
                rec = RoundRecord(round=round_no)
                result.rounds.append(rec)
                # -- the worker drafts (a child with its own budget, reserved from ours) --
                self._set_phase(f"round {round_no}: worker drafting")
                worker = AgentTaskInput(
                    name=f"worker-{round_no}", role="worker", prompt="dr/plan", prompt_version=inp.prompt_version,
                    instructions=worker_instructions(inp), context=list(context), tools=list(PLANNING_TOOLS),
                    kind="plan", model=inp.worker_model, sim=inp.sim, budget=inp.worker_budget or WORKER_BUDGET,
                    max_steps=6, max_output_tokens=WORKER_MAX_OUTPUT_TOKENS, customer=inp.customer,
                    feature=inp.feature, task_type=TASK_TYPE, key=f"{key}/worker",
                )
                before = children.usage
                res = await children.run(worker, summary=f"round {round_no}: worker drafts the plan "
                                                         f"· {inp.worker_model.label}")
                child = children.records[-1]
                rec.worker_id, rec.worker_status = child.workflow_id, child.status
                rec.worker_usage = children.usage.minus(before)
                if res is None:
                    escalation = f"round {round_no}: the worker did not produce a plan ({child.status}: {child.reason})"
                    rec.action, rec.note = "escalate", escalation
                    break
                # -- the deterministic rules --
                self._set_phase(f"round {round_no}: rule check")
                plan, violations = parse_plan(res.output)
                if plan is not None:
                    violations = check_plan(plan.steps, rules, SERVICES)
                rec.plan, rec.violations = plan, violations
                runner.decide("rule_check", f"round {round_no}: " + (
                    f"{len(violations)} violation(s): " + "; ".join(v.line() for v in violations[:3])
                    if violations else f"all {len(rule_ids)} rules pass"))
                # -- the supervisor's own LLM review --
                self._set_phase(f"round {round_no}: review")
                own_before = usage_of(runner)
                messages = [Message(role="user", content=t) for t in
                            review_messages_text(inp, round_no, plan, res.output, rule_ids, violations)]
                resp = await runner.llm("review", "dr/review", messages, json_output=True)
                rec.review_usage = usage_of(runner).minus(own_before)
                verdict, note = parse_verdict(resp.text)
                if verdict is not None:
                    rec.verdict, rec.feedback = verdict.verdict, verdict.feedback
                else:
                    rec.note = f"{note}; counted as revise"
                    runner.observe(rec.note)
                action, why = decide_round(round_no, inp.max_rounds, violations, verdict)
                rec.action = action
                runner.decide(action, why)
                if action == "accept":
                    accepted = plan
                    break
                if action == "escalate":
                    escalation = why
                    break
                context = feedback_context(rec)
        except BudgetExceeded as e:
            runner.decide("kill", str(e))
            escalation = f"budget exhausted in round {len(result.rounds)}: {e}"

        last_plan = next((r.plan for r in reversed(result.rounds) if r.plan is not None), None)
        if accepted is not None:
            self._set_phase("publishing the plan")
            body = plan_markdown(inp, accepted, len(result.rounds))
            published = await children.publish(
                "plan", f"{topic}: {inp.scenario.strip()[:150]}", body, status="resolved",
                reason=f"accepted in round {len(result.rounds)} of {inp.max_rounds}", category=topic)
            result.status, result.plan = "accepted", accepted
            result.reason = f"accepted in round {len(result.rounds)} of {inp.max_rounds}"
            result.report_id = str(published.content.get("report_id")) if published.ok else None
        else:
            self._set_phase("escalating to a human")
            reason = escalation or "no plan was accepted"
            queued = await children.escalate(reason, priority="high", category=topic)
            result.status, result.reason, result.plan = "escalated", reason, last_plan
            result.queue_item_id = str(queued.content.get("queue_item_id")) if queued.ok else None

        total = children.total()
        result.worker_usage = children.usage
        result.review_usage = usage_of(runner)
        result.usage = total
        result.review_overhead = round(result.review_usage.tokens / total.tokens, 4) if total.tokens else 0.0
        result.children = children.records
        result.decisions = runner.decisions
        result.budget = runner.budget.report()
        self._status, self._phase = result.status, "done"
        updates: list[SearchAttributeUpdate[Any]] = [
            SA_STATUS.value_set(result.status), SA_TOKENS.value_set(total.tokens), SA_COST.value_set(total.cost_usd),
        ]
        workflow.upsert_search_attributes(updates)
        return result
