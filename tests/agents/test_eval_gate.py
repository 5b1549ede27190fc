"""The statistical gate `make test` runs on the sim: the support desk's core cases (its sample tickets,
every category) 50 times in all through the real workflow: at least 95% of runs pass, no forbidden tool
is ever executed, and the p95 of tokens per task stays under the agent's budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import Client

from agents.support_desk import store, support_desk
from keel.evals import percentile
from keel.testing import agent_environment
from keel.types import AgentResult
from starter.eval_cli import SuiteRunner, load_suite

SUITE = Path(__file__).resolve().parent.parent.parent / "evals" / "support_desk.yaml"


async def test_the_support_desk_passes_its_core_cases_on_the_sim(client: Client, db_url: str) -> None:
    suite = load_suite(SUITE)
    core = [c for c in suite.cases if "core" in c.tags][:10]
    async with agent_environment(support_desk, client=client, db_url=db_url) as env:
        runner = SuiteRunner(env.client, env.settings, suite, models=None, prompt_version=None, temperature=0.0,
                             spiral_rate=None, concurrency=25)  # the sim's default spirals included
        scores, results = await runner.run(core, 5, "gate", quiet=True)
        store.engine_for()
    runs = [s for case in scores.values() for s in case]
    done = [r for case in results.values() for r in case if isinstance(r, AgentResult)]
    assert len(runs) == 50 and len(done) == 50  # no task lost
    passed = sum(s.passed for s in runs) / len(runs)
    failing = [(s.workflow_id, s.problems) for s in runs if not s.passed]
    assert passed >= 0.95, (passed, failing)
    forbidden = [r.workflow_id for c in core for r in results[c.id]
                 if isinstance(r, AgentResult) and set(c.must_not_call) & set(r.tools_executed)]
    assert not forbidden
    assert percentile([r.tokens for r in done], 0.95) < (support_desk.budget.max_tokens or 0)
    pytest.importorskip("yaml")  # the suite is YAML: pyyaml is a dependency
