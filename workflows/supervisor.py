"""PLACEHOLDER for SupervisedPlanWorkflow (issue #6): replaced by the pattern's implementation."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from core import names


@workflow.defn(name=names.SUPERVISED_PLAN_WORKFLOW)
class SupervisedPlanWorkflow:
    @workflow.run
    async def run(self, inp: dict[str, object]) -> dict[str, object]:
        raise NotImplementedError
