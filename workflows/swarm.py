"""SwarmWorkflow: K peer agents classify the same ticket in parallel; agreement is the confidence.

Each peer is a child AgentTaskWorkflow (`<swarm id>/peer-<i>`): no tools, one JSON classification
call, with its own model, temperature, sim seed and budget, reserved from the swarm's before it starts.
The answers are aggregated deterministically (keel.swarm.aggregate: invalid output, a failed peer or
one that never started is an abstention and counts against agreement). Agreement at or above the
threshold publishes the answer (tool publish_report, kind swarm_answer); below it the task goes to
the human queue (tool escalate_to_human) with every peer's answer in the reason and in the result.
The parent makes no model call of its own: its usage is the sum of its peers' (the ledger's
family_totals).
"""

from __future__ import annotations

import asyncio
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate

with workflow.unsafe.imports_passed_through():
    from keel import names
    from keel import swarm as sw
    from keel.policy import budget_for
    from keel.types import AgentTaskInput, AgentTaskResult, ChildRecord, ModelSpec

from workflows.children import Children, PatternParent, parent_runner, usage_of

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)


def peer_input(inp: sw.SwarmInput, spec: sw.PeerSpec, key: str, customer: str) -> AgentTaskInput:
    sim = (spec.sim or inp.sim).model_copy(update={"seed": spec.seed})
    return AgentTaskInput(
        name=spec.name,
        role="peer",
        prompt=sw.PROMPT,
        prompt_version=inp.prompt_version,
        instructions=inp.question or sw.DEFAULT_QUESTION,
        context=[sw.peer_context(inp)],
        kind="classify",
        json_output=True,
        model=spec.model,
        temperature=spec.temperature,
        sim=sim,
        budget=spec.budget or inp.peer_budget or sw.SWARM_POLICY.peer_budget,
        max_steps=1,
        max_output_tokens=sw.SWARM_POLICY.peer_max_output_tokens,
        customer=customer,
        feature=inp.feature,
        task_type=sw.PEER_TASK_TYPE,
        key=key,
        inject_failure=spec.inject_failure,
    )


def _answer(spec: sw.PeerSpec, rec: ChildRecord, res: AgentTaskResult | None) -> sw.PeerAnswer:
    if res is None:  # failed on every attempt, or never started (its budget did not fit)
        return sw.peer_answer(spec, None, workflow_id=rec.workflow_id, model=rec.model, status=rec.status,
                              error=f"peer {rec.status}: {rec.reason}" if rec.reason else "", usage=rec.usage)
    error = f"peer {res.status}: {res.reason}" if res.status != "completed" else ""
    return sw.peer_answer(spec, res.output, workflow_id=res.workflow_id, model=res.model, status=res.status,
                          error=error, usage=rec.usage)


@workflow.defn(name=names.SWARM_WORKFLOW)
class SwarmWorkflow(PatternParent):
    @workflow.run
    async def run(self, inp: sw.SwarmInput) -> sw.SwarmResult:
        info = workflow.info()
        customer = inp.customer_id.strip() or "internal"
        threshold = sw.threshold_of(inp)
        result = sw.SwarmResult(workflow_id=info.workflow_id, ticket_id=inp.ticket_id, customer_id=customer,
                                status="rejected", threshold=threshold)
        problems = sw.problems(inp)
        if problems:
            self._status, self._phase = "rejected", "rejected"
            result.reason = "; ".join(problems)
            workflow.upsert_search_attributes([SA_STATUS.value_set("rejected")])
            return result

        runner = parent_runner(sw.TASK_TYPE, inp.feature, inp.budget or budget_for(sw.TASK_TYPE),
                               ModelSpec(provider="sim", model="sim-large"), inp.sim, customer=customer,
                               key=inp.ticket_id, prompt_version=inp.prompt_version)
        children = Children(runner, max_attempts=inp.peer_attempts)
        self._children = children
        specs = sw.resolve_peers(inp)
        key = inp.ticket_id or info.workflow_id  # the sim peers seed on it: same ticket, same votes
        self._phase = f"{len(specs)} peers classifying"
        results = await asyncio.gather(*(
            children.run(peer_input(inp, spec, key, customer),
                         summary=f"swarm peer {spec.name} · {spec.model.label} · T={spec.temperature:g} "
                                 f"· seed {spec.seed}")
            for spec in specs
        ))
        records = {r.name: r for r in children.records}
        answers = [_answer(spec, records[spec.name], res) for spec, res in zip(specs, results, strict=True)]

        self._phase = "aggregating"
        agg = sw.aggregate(answers, threshold)
        for a in answers:
            if not a.valid:
                runner.decide("abstain", f"{a.peer}: {a.error}")
        result = result.model_copy(update={
            "answer": agg.answer, "urgency": agg.urgency, "agreement": agg.agreement, "confidence": agg.confidence,
            "mean_peer_confidence": agg.mean_peer_confidence, "votes": agg.votes, "abstentions": agg.abstentions,
            "peers": answers,
        })
        if agg.accepted:
            runner.decide("accept", f"agreement {agg.agreement:.2f} >= threshold {threshold:.2f} on {agg.answer}")
            self._phase = "publishing"
            title = f"{agg.answer}: {agg.agreement:.0%} of {agg.k} peers agree"
            res = await children.publish("swarm_answer", title, sw.answer_body(agg, answers), status="resolved",
                                         reason=title, category=agg.answer)
            result.status, result.reason = "accepted", title
            result.report_id = str(res.content.get("report_id", ""))
        else:
            reason = sw.escalation_reason(agg, answers)
            runner.decide("escalate", reason)
            self._phase = "escalating to a human"
            res = await children.escalate(reason, priority=sw.queue_priority(answers), category=agg.answer)
            result.status, result.reason, result.queue_reason = "escalated", reason, reason
            result.queue_item_id = str(res.content.get("queue_item_id", ""))

        usage = children.total()
        result = result.model_copy(update={
            "children": list(children.records), "usage": usage, "own_usage": usage_of(runner),
            "budget": runner.budget.report(), "decisions": list(runner.decisions),
        })
        self._status, self._phase = result.status, "done"
        updates: list[SearchAttributeUpdate[Any]] = [
            SA_STATUS.value_set(result.status),
            SA_TOKENS.value_set(usage.tokens),
            SA_COST.value_set(usage.cost_usd),
        ]
        workflow.upsert_search_attributes(updates)
        return result
