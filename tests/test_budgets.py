"""BudgetGuard on its own (no Temporal): hypothesis properties over any sequence of calls, any budget
and any priced model, plus the reserve/settle bookkeeping of child tasks.

The guard is told an estimate of each prompt and an output cap; it answers with the output the call
may use, or `BudgetExceeded`. A provider that respects the allowance (input no larger than the
estimate, output no larger than the allowance) must then never take a task past either limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from keel.pricing import PRICES, cost_usd, price_for
from keel.types import Budget, ModelSpec, Usage
from workflows.budget import MIN_OUTPUT_TOKENS, BudgetExceeded, BudgetGuard, Reservation

USD_EPS = 1e-9
"""Float noise allowed on dollar sums (a billionth of a dollar); prices are rounded to 8 decimals."""

MODELS = [ModelSpec.model_validate({"provider": p, "model": m}) for p, m in sorted(PRICES)]


def base_band_limit(model: ModelSpec) -> int:
    """The largest prompt priced at the model's base rates (see test_long_prompt_band_... for beyond)."""
    return price_for(model.provider, model.model).long_prompt_threshold or 400_000


@st.composite
def budgets(draw: st.DrawFn, limited: bool = False) -> Budget:
    max_tokens = draw(st.none() | st.integers(2_000, 40_000) | st.integers(1, 400_000))
    max_usd = draw(st.none() | st.floats(1e-4, 0.02) | st.floats(1e-3, 0.2) | st.floats(1e-5, 5.0))
    if limited and max_tokens is None and max_usd is None:
        max_tokens = draw(st.integers(1, 120_000))
    soft, hard = sorted(draw(st.lists(st.floats(0.01, 0.99, allow_nan=False), min_size=2, max_size=2)))
    return Budget(max_tokens=max_tokens, max_usd=max_usd, soft_ratio=soft, hard_ratio=hard)


@dataclass
class PlannedCall:
    model: ModelSpec
    est_input: int
    out_cap: int
    input_share: float
    """Actual input tokens as a share of the estimate (the estimate is an upper bound)."""
    output_share: float
    """Actual output tokens as a share of what the guard allowed."""
    cached_share: float


@st.composite
def planned_calls(draw: st.DrawFn) -> PlannedCall:
    model = draw(st.sampled_from(MODELS))
    return PlannedCall(
        model=model,
        est_input=draw(st.integers(0, 4_000) | st.integers(0, base_band_limit(model))),
        out_cap=draw(st.integers(MIN_OUTPUT_TOKENS, 2_000) | st.integers(MIN_OUTPUT_TOKENS, 32_000)),
        input_share=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0, 1)),
        output_share=draw(st.sampled_from([0.0, 1.0]) | st.floats(0, 1)),
        cached_share=draw(st.sampled_from([0.0, 0.0, 1.0]) | st.floats(0, 1)),
    )


def in_cost(model: ModelSpec, tokens: int) -> float:
    return cost_usd(model.provider, model.model, Usage(input_tokens=tokens))


def per_output_token(model: ModelSpec) -> float:
    return cost_usd(model.provider, model.model, Usage(output_tokens=1_000_000)) / 1_000_000


def fits(guard: BudgetGuard, call: PlannedCall) -> bool:
    """Whether a call of at least MIN_OUTPUT_TOKENS output clearly fits what is left of both limits."""
    b = guard.budget
    if b.max_tokens is not None:
        left = b.max_tokens - guard.used_tokens - guard.reserved_tokens
        if call.est_input + MIN_OUTPUT_TOKENS > left:
            return False
    if b.max_usd is not None:
        left_usd = b.max_usd - guard.used_usd - guard.reserved_usd
        need = in_cost(call.model, call.est_input) + MIN_OUTPUT_TOKENS * per_output_token(call.model)
        if need + USD_EPS > left_usd:
            return False
    return True


def check_thresholds(guard: BudgetGuard, fired: list[str], step: int, before: tuple[int | None, int | None]) -> None:
    soft_before, hard_before = before
    b = guard.budget
    assert fired in ([], ["soft"], ["hard"], ["soft", "hard"])
    # Each fires once: a recorded step never moves, and a threshold that fired is not reported again.
    if soft_before is not None:
        assert guard.soft_at_step == soft_before and "soft" not in fired
    if hard_before is not None:
        assert guard.hard_at_step == hard_before and "hard" not in fired
    assert ("soft" in fired) == (soft_before is None and guard.soft_at_step == step)
    assert ("hard" in fired) == (hard_before is None and guard.hard_at_step == step)
    # A threshold that has been reached has fired.
    share = guard.share()
    if share >= b.soft_ratio:
        assert guard.soft_at_step is not None
    if share >= b.hard_ratio:
        assert guard.hard_at_step is not None
    # Soft before hard.
    if guard.hard_at_step is not None:
        assert guard.soft_at_step is not None and guard.soft_at_step <= guard.hard_at_step


@settings(max_examples=300, deadline=None)
@given(budget=budgets(), calls=st.lists(planned_calls(), max_size=25))
def test_guard_never_lets_a_task_cross_its_limits(budget: Budget, calls: list[PlannedCall]) -> None:
    guard = BudgetGuard(budget)
    for step, call in enumerate(calls, start=1):
        could_fit = fits(guard, call)
        used_before = (guard.used_tokens, guard.used_usd)
        try:
            allowance = guard.allow_call(call.model, call.est_input, call.out_cap)
        except BudgetExceeded as e:
            event(f"refused on {e.limit}")
            # Refused only when no useful call fits; the task is stopped with a reason naming the limit.
            assert not could_fit, f"refused a call that fits: {call} with {guard.report()}"
            assert e.limit in ("tokens", "usd")
            assert guard.limit_hit == e.limit and guard.state == "killed"
            assert str(e) == guard.detail and "used" in guard.detail
            if e.limit == "tokens":
                assert budget.max_tokens is not None and f"of {budget.max_tokens:,}" in str(e)
            else:
                assert budget.max_usd is not None and f"of ${budget.max_usd:.4f}" in str(e)
            # Nothing was charged for the call that was not made.
            assert (guard.used_tokens, guard.used_usd) == used_before
            return
        assert MIN_OUTPUT_TOKENS <= allowance.max_output_tokens <= call.out_cap
        if budget.max_tokens is not None:
            assert allowance.max_input_tokens is not None
            assert call.est_input <= allowance.max_input_tokens
        else:
            assert allowance.max_input_tokens is None

        # The provider respects the allowance.
        input_tokens = int(call.est_input * call.input_share)
        usage = Usage(
            input_tokens=input_tokens,
            output_tokens=int(allowance.max_output_tokens * call.output_share),
            cached_input_tokens=int(input_tokens * call.cached_share),
        )
        before = (guard.soft_at_step, guard.hard_at_step)
        guard.charge(usage.total_tokens, cost_usd(call.model.provider, call.model.model, usage))
        if budget.max_tokens is not None:
            assert guard.used_tokens <= budget.max_tokens
        if budget.max_usd is not None:
            assert guard.used_usd <= budget.max_usd + USD_EPS
        fired = guard.crossed(step)
        for threshold in fired:
            event(f"{threshold} fired")
        check_thresholds(guard, fired, step, before)

        report = guard.report()
        assert report.used_tokens == guard.used_tokens
        assert report.state == ("hard" if guard.hard_at_step is not None
                                else "soft" if guard.soft_at_step is not None else "ok")
        assert report.limit_hit is None


@settings(max_examples=200, deadline=None)
@given(budget=budgets(), shares=st.lists(st.floats(0, 0.5), max_size=30))
def test_thresholds_fire_in_order_once_each(budget: Budget, shares: list[float]) -> None:
    """Whatever the usage (even past the limits, as a guard fed someone else's usage would see), soft
    fires before or with hard, each once, and the state follows them."""
    guard = BudgetGuard(budget)
    fired_all: list[str] = []
    for step, s in enumerate(shares, start=1):
        guard.charge(int(s * (budget.max_tokens or 0)), s * (budget.max_usd or 0.0))
        before = (guard.soft_at_step, guard.hard_at_step)
        fired = guard.crossed(step)
        check_thresholds(guard, fired, step, before)
        assert guard.crossed_last is fired
        fired_all += fired
    assert fired_all in ([], ["soft"], ["soft", "hard"])
    if not budget.limited:
        assert fired_all == [] and guard.state == "ok"


@settings(max_examples=300, deadline=None)
@given(
    budget=budgets(limited=True),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("reserve"), st.none() | st.integers(1, 60_000), st.none() | st.floats(1e-4, 2.0)),
            st.tuples(st.just("settle"), st.integers(0, 10), st.floats(0, 1)),
            st.tuples(st.just("call"), st.integers(0, 20_000), st.floats(0, 1)),
        ),
        max_size=30,
    ),
)
def test_reserve_and_settle_keep_the_books(budget: Budget, ops: list[tuple[str, object, object]]) -> None:
    guard = BudgetGuard(budget)
    model = ModelSpec(provider="sim", model="sim-small")
    open_: list[Reservation] = []
    for op, a, b in ops:
        if op == "reserve":
            assert a is None or isinstance(a, int)
            assert b is None or isinstance(b, float)
            child = Budget(max_tokens=a, max_usd=b)
            held = (guard.reserved_tokens, guard.reserved_usd)
            left_t = None if budget.max_tokens is None else budget.max_tokens - guard.used_tokens - held[0]
            left_u = None if budget.max_usd is None else budget.max_usd - guard.used_usd - held[1]
            fits_t = left_t is None or (a is not None and a <= left_t)
            fits_u = left_u is None or (b is not None and b <= left_u)
            if fits_t and fits_u:
                r = guard.reserve(child)
                assert (r.tokens, r.usd) == (a or 0, b or 0.0)
                open_.append(r)
            else:
                # A child that does not fit (or is unlimited under a limited parent) is refused, and
                # nothing is held for it.
                with pytest.raises(BudgetExceeded) as exc:
                    guard.reserve(child)
                assert "does not fit" in str(exc.value)
                event("child refused")
                assert (guard.reserved_tokens, guard.reserved_usd) == held
        elif op == "settle" and open_:
            assert isinstance(a, int) and isinstance(b, float)
            r = open_.pop(a % len(open_))
            # A child never spends more than it was given.
            guard.settle(r, int(r.tokens * b), r.usd * b)
        elif op == "call":
            assert isinstance(a, int) and isinstance(b, float)
            try:
                allowance = guard.allow_call(model, a, 800)
            except BudgetExceeded:
                continue
            usage = Usage(input_tokens=a, output_tokens=int(allowance.max_output_tokens * b))
            guard.charge(usage.total_tokens, cost_usd("sim", "sim-small", usage))

        # Reserved is exactly what the open reservations hold; used + reserved stays within the limits.
        assert guard.reserved_tokens == sum(r.tokens for r in open_)
        assert guard.reserved_usd == pytest.approx(sum(r.usd for r in open_), abs=USD_EPS)
        if budget.max_tokens is not None:
            assert guard.used_tokens + guard.reserved_tokens <= budget.max_tokens
        if budget.max_usd is not None:
            assert guard.used_usd + guard.reserved_usd <= budget.max_usd + USD_EPS
        report = guard.report()
        assert report.reserved_tokens == guard.reserved_tokens
    for r in open_:
        guard.settle(r, 0, 0.0)
    assert guard.reserved_tokens == 0 and guard.reserved_usd == pytest.approx(0.0, abs=USD_EPS)


def test_output_is_lowered_to_what_is_left() -> None:
    guard = BudgetGuard(Budget(max_tokens=1_000, max_usd=None))
    allowance = guard.allow_call(MODELS[0], 700, 800)
    assert allowance.max_output_tokens == 300
    assert allowance.max_input_tokens == 700


def test_a_call_that_cannot_answer_usefully_is_not_made() -> None:
    guard = BudgetGuard(Budget(max_tokens=1_000, max_usd=None))
    guard.charge(900, 0.0)
    with pytest.raises(BudgetExceeded) as exc:
        guard.allow_call(MODELS[0], 50, 800)
    assert exc.value.limit == "tokens"
    assert "900 used" in str(exc.value) and "of 1,000" in str(exc.value)


def test_dollar_kill_names_dollars() -> None:
    guard = BudgetGuard(Budget(max_tokens=100_000, max_usd=0.01))
    guard.charge(1_000, 0.0095)
    with pytest.raises(BudgetExceeded) as exc:
        guard.allow_call(ModelSpec(provider="sim", model="sim-large"), 1_000, 800)
    assert exc.value.limit == "usd"
    assert "$0.0095 used" in str(exc.value) and "of $0.0100" in str(exc.value)


def test_long_prompt_band_is_priced_into_the_allowance() -> None:
    model = ModelSpec(provider="anthropic", model="claude-sonnet-4-5")
    guard = BudgetGuard(Budget(max_tokens=None, max_usd=1.5))
    allowance = guard.allow_call(model, 210_000, 20_000)
    # The provider uses exactly the estimate and the allowance: $1.26 input + 15,999 x $22.50/M.
    usage = Usage(input_tokens=210_000, output_tokens=allowance.max_output_tokens)
    guard.charge(usage.total_tokens, cost_usd(model.provider, model.model, usage))
    assert guard.used_usd <= 1.5


def test_refused_child_names_the_limit_it_does_not_fit() -> None:
    guard = BudgetGuard(Budget(max_tokens=10_000, max_usd=0.01))
    with pytest.raises(BudgetExceeded) as exc:
        guard.reserve(Budget(max_tokens=1_000, max_usd=0.05))
    assert exc.value.limit == "usd"


def test_soft_threshold_never_follows_hard() -> None:
    # Refused up front, so the order of the thresholds can never be violated.
    with pytest.raises(ValueError, match="soft_ratio"):
        Budget(max_tokens=1_000, max_usd=None, soft_ratio=0.9, hard_ratio=0.5)


def test_request_chars_counts_tool_specs_as_their_json() -> None:
    """The remembered size of a tool spec equals its JSON, for cached specs and for copies."""
    import json

    from agents.support_desk import support_desk
    from keel.tokens import request_chars
    from keel.types import Message

    specs = support_desk.tool_specs(list(support_desk.tool_map))
    for k in range(len(specs) + 1):
        expected = len(json.dumps([t.model_dump() for t in specs[:k]])) if k else 0
        assert request_chars([Message(role="user", content="hi")], specs[:k]) == 2 + expected
        assert request_chars([], [s.model_copy(deep=True) for s in specs[:k]]) == expected
