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

from temporalio import workflow
from temporalio.common import SearchAttributeKey

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from keel import errors, names, registry
    from keel.orchestration import (
        ChildTask,
        OrchestratorInput,
        OrchestratorResult,
        OrchestratorStatus,
        PeerAnswer,
        Plan,
        SwarmInput,
        SwarmResult,
        SwarmStatus,
        child_caps,
        named,
        plan_problems,
        stages,
        tally,
    )
    from keel.supervision import MISSING, field_value
    from keel.types import AgentInput, AgentResult, Budget, ChildRecord, ModelSpec, TaskStatus

from workflows.children import Children, PatternParent, finish_parent, parent_runner, stage_caps, with_books

SA_STATUS = SearchAttributeKey.for_keyword(names.SA_STATUS)
SA_TOKENS = SearchAttributeKey.for_int(names.SA_TOKENS)
SA_COST = SearchAttributeKey.for_float(names.SA_COST_USD)
SA_BUDGET = SearchAttributeKey.for_keyword(names.SA_BUDGET)

_OUTCOME: dict[OrchestratorStatus, TaskStatus] = {
    "completed": "resolved", "partial": "escalated", "escalated": "escalated", "budget_exceeded": "budget_exceeded",
    "rejected": "rejected",
}


@workflow.defn(name=names.ORCHESTRATOR_WORKFLOW, failure_exception_types=[errors.KeelError])
class OrchestratorWorkflow(PatternParent):
    @workflow.run
    async def run(self, inp: OrchestratorInput) -> OrchestratorResult:
        wid = workflow.info().workflow_id
        runner = parent_runner(inp.name, inp.feature or inp.name, inp.budget, ModelSpec(), inp.sim,
                               tenant=inp.tenant, key=inp.key, heartbeat_timeout_s=inp.llm_heartbeat_timeout_s)
        self._children = children = Children(runner, inp.max_child_attempts)
        result = OrchestratorResult(workflow_id=wid, status="completed")
        known = {a.name for a in registry.registered()}

        if inp.synthesizer and inp.synthesizer not in known:
            return await self._end(children, result, "rejected",
                                   f"no synthesizer agent {inp.synthesizer!r} is registered")
        # 1. The plan: given, or the planner agent's structured answer.
        tasks = named(inp.tasks)
        result.plan_source = "given"
        if inp.planner:
            self._phase = "plan"
            result.plan_source = "planner"
            if inp.planner not in known:
                return await self._end(children, result, "rejected", f"no planner agent {inp.planner!r} is registered")
            planned = await self._child(children, inp, "planner", "planner", inp.planner, inp.input, [],
                                        stage_caps(children, [child_caps(inp, "planner",
                                                                         registry.get(inp.planner).budget)])[0])
            tasks, why = self._plan_of(planned)
            if planned is not None:
                result.results["planner"] = planned
            if why:
                return await self._end(children, result, "escalated", f"the planner gave no usable plan: {why}")
        result.plan = tasks
        problems = plan_problems(tasks, known)
        unknown = sorted(set(inp.child_budgets) - {t.name for t in tasks} - {"planner", "synthesizer"})
        if unknown:
            problems.append(f"child_budgets name {unknown}, which are not tasks of the plan "
                            f"({', '.join(t.name for t in tasks)})")
        if problems:
            return await self._end(children, result, "rejected", "the plan cannot run: " + "; ".join(problems))

        # 2. The tasks, stage by stage; each task's `after` answers are its context.
        self._phase = "tasks"
        answers: dict[str, str] = {}
        for stage in stages(tasks) or []:
            caps = stage_caps(children, [child_caps(inp, t.name, t.budget or registry.get(t.agent).budget)
                                         for t in stage])
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

        # 3. The answer: the synthesizer's over the children's answers (and a note of each task that did
        # not deliver, so it never passes a partial answer off as whole), or theirs under their names.
        sections = [f"{t.name} ({t.agent}): {answers[t.name]}" for t in tasks if t.name in answers]
        if inp.synthesizer and sections:
            self._phase = "synthesize"
            notes = [f"Missing: {m}" for m in result.missing]
            res = await self._child(children, inp, "synthesizer", "synthesizer", inp.synthesizer, inp.input,
                                    sections + notes, stage_caps(children, [child_caps(
                                        inp, "synthesizer", registry.get(inp.synthesizer).budget)])[0])
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
                           feature=inp.feature or inp.name, budget=fitted, approval_mode=inp.approval_mode, sim=inp.sim,
                           models=inp.models, prices=inp.prices,
                           llm_heartbeat_timeout_s=inp.llm_heartbeat_timeout_s)
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
        self._phase, self._status = "done", status
        await finish_parent(children, status, _OUTCOME[status], reason)
        return with_books(children, result.model_copy(update={"status": status, "reason": reason}))



_SWARM_OUTCOME: dict[SwarmStatus, TaskStatus] = {
    "completed": "resolved", "escalated": "escalated", "budget_exceeded": "budget_exceeded", "rejected": "rejected",
}


@workflow.defn(name=names.SWARM_AGENTS_WORKFLOW, failure_exception_types=[errors.KeelError])
class SwarmAgentsWorkflow(PatternParent):
    """The swarm pattern over any registered agent with a structured answer: K peers in parallel under
    the parent's budget (their caps shrunk to equal shares when they do not fit), each its own seed
    (`<key>-peer-i`), temperature and (when `models` is given) model, all dry runs; the value of one
    field of their answers is put to a vote, and a value without more than `quorum` of the peers behind
    it goes to a human. Each peer's whole structured answer is kept beside its vote."""

    @workflow.run
    async def run(self, inp: SwarmInput) -> SwarmResult:
        wid = workflow.info().workflow_id
        runner = parent_runner(inp.name, inp.feature or inp.name, inp.budget, ModelSpec(), inp.sim,
                               tenant=inp.tenant, key=inp.key, heartbeat_timeout_s=inp.llm_heartbeat_timeout_s)
        self._children = children = Children(runner, 1)
        result = SwarmResult(workflow_id=wid, status="completed")
        agent = registry.find(inp.agent)
        problem = (f"no agent {inp.agent!r} is registered on this worker" if agent is None else
                   f"agent {inp.agent!r} declares no structured answer (output_type) to vote on"
                   if agent.output_type is None else None)
        if agent is None or problem:
            return await self._end(children, result, "rejected", problem or "")
        self._phase = "peers"
        caps = stage_caps(children, [agent.budget] * inp.peers)
        names_ = [f"peer-{i + 1}" for i in range(inp.peers)]
        temperatures = [inp.temperatures[i % len(inp.temperatures)] for i in range(inp.peers)]
        tiers = " / ".join(dict.fromkeys(m.model for m in (inp.tier_models or {}).values()))  # KEEL_MODEL_*
        models = [inp.models[i % len(inp.models)].model if inp.models else tiers for i in range(inp.peers)]

        async def peer(i: int) -> AgentResult | None:
            wanted, fitted, why = caps[i]
            if why:
                children.runner.decide("skip_child", f"{names_[i]}: {why}")
                children.records.append(ChildRecord(name=names_[i], role="peer", model=inp.agent,
                                                    status="not_started", reason=why))
                return None
            if fitted != wanted:
                children.runner.decide("shrink_child", f"{names_[i]}: caps {_caps(wanted)} do not fit; "
                                                       f"given {_caps(fitted)}")
            model = inp.models[i % len(inp.models)] if inp.models else None
            child = AgentInput(agent=inp.agent, input=inp.input, key=f"{inp.key or wid}-peer-{i + 1}",
                               tenant=inp.tenant, feature=inp.feature or inp.name, budget=fitted, dry_run=True,
                               approval_mode="escalate", sim=inp.sim, temperature=temperatures[i],
                               models={"small": model, "large": model} if model is not None else inp.tier_models,
                               prices=inp.prices, llm_heartbeat_timeout_s=inp.llm_heartbeat_timeout_s)
            return await children.run_agent(names_[i], "peer", child)

        ran = await asyncio.gather(*(peer(i) for i in range(inp.peers)))
        for i, (name, res) in enumerate(zip(names_, ran, strict=True)):
            who = PeerAnswer(name=name, status="", model=models[i], temperature=temperatures[i])
            if res is None:
                rec = next(r for r in children.records if r.name == name)
                result.answers.append(who.model_copy(update={"status": rec.status,
                                                             "problem": rec.reason or "did not run"}))
                continue
            value = field_value(inp.field, res.output, res.structured)
            who = who.model_copy(update={"status": res.status, "answer": res.structured})
            if res.status != "completed":
                result.answers.append(who.model_copy(update={"problem": res.reason or res.status}))
            elif value is MISSING:
                result.answers.append(who.model_copy(update={"problem": f"its answer has no field {inp.field!r}"}))
            else:
                result.answers.append(who.model_copy(update={"value": value}))
        result.value, result.votes, result.agreement, why = tally(result.answers, inp.peers, inp.quorum)
        if why:
            limited = runner.budget.limit_hit is not None or all(a.status == "budget_exceeded" for a in result.answers)
            return await self._end(children, result, "budget_exceeded" if limited and not result.votes else "escalated",
                                   f"no agreement on {inp.field}: {why}")
        return await self._end(children, result, "completed",
                               f"{inp.field} = {result.value!r} ({result.agreement:.0%} of {inp.peers} peers)")

    async def _end(self, children: Children, result: SwarmResult, status: SwarmStatus, reason: str) -> SwarmResult:
        self._phase, self._status = "done", status
        await finish_parent(children, status, _SWARM_OUTCOME[status], reason)
        return with_books(children, result.model_copy(update={"status": status, "reason": reason}))


def _caps(b: Budget) -> str:
    tokens = f"{b.max_tokens:,} tokens" if b.max_tokens is not None else "unlimited tokens"
    return tokens + (f", ${b.max_usd:.4f}" if b.max_usd is not None else ", unlimited dollars")
