"""Per-task budgets in workflow state: soft (wrap up), hard (answer now), kill (no call that would
cross the limit is made). Deterministic: plain arithmetic over the usage the activities report.

Before every model call the guard estimates the prompt (4 characters a token, with an allowance for
the system prompt the workflow does not see) and reserves the output cap; if the sum would cross
either limit, the output cap is lowered to what is left, and if too little is left the call is not
made at all: `BudgetExceeded` ends the task with what it has. Child tasks reserve their own caps from
the parent before they start, so parallel children cannot race past the parent's budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from keel.pricing import cost_usd
    from keel.types import Budget, BudgetReport, LimitKind, ModelSpec, Price, Usage

MIN_OUTPUT_TOKENS = 64
"""A call that could only answer with fewer tokens than this is not worth making."""


class BudgetExceeded(Exception):
    """A limit stops the task. `limit` says which; the message says its value and what was used."""

    def __init__(self, limit: LimitKind, message: str) -> None:
        super().__init__(message)
        self.limit: LimitKind = limit


@dataclass
class Reservation:
    tokens: int
    usd: float


@dataclass
class CallAllowance:
    max_output_tokens: int
    max_input_tokens: int | None


class BudgetGuard:
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.used_tokens = 0
        self.used_usd = 0.0
        self.reserved_tokens = 0
        self.reserved_usd = 0.0
        self.soft_at_step: int | None = None
        self.hard_at_step: int | None = None
        self.limit_hit: LimitKind | None = None
        self.detail = ""
        self.crossed_last: list[str] = []

    # -- state ------------------------------------------------------------------------------
    def _left_tokens(self) -> int | None:
        b = self.budget.max_tokens
        return None if b is None else b - self.used_tokens - self.reserved_tokens

    def _left_usd(self) -> float | None:
        b = self.budget.max_usd
        return None if b is None else b - self.used_usd - self.reserved_usd

    def share(self) -> float:
        """The larger share used (and reserved) of the two limits."""
        shares = [0.0]
        if self.budget.max_tokens:
            shares.append((self.used_tokens + self.reserved_tokens) / self.budget.max_tokens)
        if self.budget.max_usd:
            shares.append((self.used_usd + self.reserved_usd) / self.budget.max_usd)
        return max(shares)

    @property
    def state(self) -> str:
        if self.limit_hit:
            return "killed"
        if self.hard_at_step is not None:
            return "hard"
        if self.soft_at_step is not None:
            return "soft"
        return "ok"

    def report(self) -> BudgetReport:
        return BudgetReport.model_validate(
            {
                "max_tokens": self.budget.max_tokens,
                "max_usd": self.budget.max_usd,
                "used_tokens": self.used_tokens,
                "used_usd": round(self.used_usd, 8),
                "reserved_tokens": self.reserved_tokens,
                "reserved_usd": round(self.reserved_usd, 8),
                "state": self.state,
                "soft_at_step": self.soft_at_step,
                "hard_at_step": self.hard_at_step,
                "limit_hit": self.limit_hit,
                "detail": self.detail,
            }
        )

    # -- before and after a call -----------------------------------------------------------
    def allow_call(self, model: ModelSpec, est_input_tokens: int, max_output_tokens: int,
                   prices: Mapping[str, Price] | None = None) -> CallAllowance:
        """How large a call may be, or BudgetExceeded if no useful call fits. `prices`: the task's pinned
        prices (its input's), over the process's table."""
        out = max_output_tokens
        left_t = self._left_tokens()
        if left_t is not None:
            out = min(out, left_t - est_input_tokens)
        left_u = self._left_usd()
        if left_u is not None:
            in_cost = cost_usd(model.provider, model.model, Usage(input_tokens=est_input_tokens), pinned=prices)
            # Output priced in the band this prompt falls in (long prompts cost more per output token).
            with_out = cost_usd(model.provider, model.model, Usage(input_tokens=est_input_tokens,
                                                                   output_tokens=1_000_000), pinned=prices)
            per_out = (with_out - in_cost) / 1_000_000
            if per_out > 0:
                out = min(out, int((left_u - in_cost) / per_out))
            elif in_cost > left_u:
                out = -1
        if out < MIN_OUTPUT_TOKENS:
            self._kill(est_input_tokens, max_output_tokens)
        return CallAllowance(out, None if left_t is None else left_t - out)

    def _kill(self, est_input: int, out_cap: int) -> None:
        b = self.budget
        parts = []
        limit: LimitKind = "tokens"
        if b.max_tokens is not None:
            parts.append(f"tokens: {self.used_tokens:,} used + {self.reserved_tokens:,} reserved of {b.max_tokens:,}")
        if b.max_usd is not None:
            parts.append(f"dollars: ${self.used_usd:.4f} used + ${self.reserved_usd:.4f} reserved of ${b.max_usd:.4f}")
            left_t = self._left_tokens()
            if left_t is None or left_t - est_input >= MIN_OUTPUT_TOKENS:
                limit = "usd"
        self.limit_hit = limit
        self.detail = (f"kill switch: the next call needs about {est_input:,} input tokens plus at least "
                       f"{MIN_OUTPUT_TOKENS} of output; " + "; ".join(parts))
        raise BudgetExceeded(limit, self.detail)

    def charge(self, tokens: int, usd: float) -> None:
        self.used_tokens += tokens
        self.used_usd += usd

    def crossed(self, step: int) -> list[str]:
        """Thresholds newly crossed after a call: "soft", then "hard" (each fires once, in order)."""
        fired: list[str] = []
        self.crossed_last = fired
        share = self.share()
        if self.soft_at_step is None and share >= self.budget.soft_ratio:
            self.soft_at_step = step
            fired.append("soft")
        if self.hard_at_step is None and share >= self.budget.hard_ratio:
            self.hard_at_step = step
            fired.append("hard")
        return fired

    def stop(self, limit: LimitKind, detail: str) -> BudgetExceeded:
        self.limit_hit = limit
        self.detail = detail
        return BudgetExceeded(limit, detail)

    # -- children --------------------------------------------------------------------------
    def _short(self, child: Budget) -> LimitKind | None:
        left_t, left_u = self._left_tokens(), self._left_usd()
        if left_t is not None and (child.max_tokens is None or child.max_tokens > left_t):
            return "tokens"
        if left_u is not None and (child.max_usd is None or child.max_usd > left_u):
            return "usd"
        return None

    def cannot_reserve(self, child: Budget) -> str | None:
        """Why a child's caps do not fit what is left (and so it must not start), or None."""
        if self._short(child) is None:
            return None
        tokens, usd = child.max_tokens or 0, child.max_usd or 0.0
        left_t, left_u = self._left_tokens(), self._left_usd()
        want = f"{tokens:,} tokens" if child.max_tokens is not None else "unlimited tokens"
        want += f", ${usd:.4f}" if child.max_usd is not None else ", unlimited dollars"
        have = f"{left_t:,} tokens" if left_t is not None else "unlimited tokens"
        have += f", ${left_u:.4f}" if left_u is not None else ", unlimited dollars"
        return f"a child task's budget ({want}) does not fit what is left of the parent's ({have})"

    def reserve(self, child: Budget) -> Reservation:
        """Hold a child's caps before it starts; refuse if they do not fit what is left."""
        short, problem = self._short(child), self.cannot_reserve(child)
        if short is not None and problem is not None:
            raise self.stop(short, problem)
        tokens, usd = child.max_tokens or 0, child.max_usd or 0.0
        self.reserved_tokens += tokens
        self.reserved_usd += usd
        return Reservation(tokens, usd)

    def settle(self, r: Reservation, used_tokens: int, used_usd: float) -> None:
        """Release a child's reservation and charge what it really used."""
        self.reserved_tokens -= r.tokens
        self.reserved_usd -= r.usd
        self.charge(used_tokens, used_usd)
