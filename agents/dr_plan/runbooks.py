"""Disaster recovery at Keel Bank (a fictional fintech), as data: its production services, its runbooks,
and the deterministic rules a recovery plan must follow, with the checker that applies them.

The rules are plain data (`StepRule`): each names a check (`first_step`, `precedes`, `never`,
`requires_field`, `followed_by`, `target_state`) and the steps it is about (`StepMatch`). Adding a
rule over the existing checks is adding a `StepRule` to `RULES` (and its id to the runbooks it
governs); only a new kind of check is code. The planner agent declares one named check per rule, and
a supervision runs a runbook's rules as `keel.Rule(op="check", value=<rule id>)` (agents.dr_plan.agent).

Pure: no I/O. The service status is a fixed snapshot of a fictional incident (the payments database's
primary in eu-west-1 is down), served by the `get_service_status` tool and used by the checker.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

# --- services ------------------------------------------------------------------------------

ServiceKind = Literal["database", "api", "dns"]
ServiceRole = Literal["primary", "replica", "active", "standby", "global"]
Health = Literal["healthy", "degraded", "down"]


class Service(BaseModel):
    name: str
    cluster: str
    """The logical service its members make up (e.g. "payments-db" for the primary and its replicas)."""
    kind: ServiceKind
    region: str
    role: ServiceRole
    health: Health
    replica_of: str | None = None
    lag_s: float | None = None
    """Replication lag behind the primary, in seconds (replicas only)."""
    holds_data: bool = False
    """Holds production data: no destructive action may touch it."""
    depends_on: list[str] = Field(default_factory=list)
    """Clusters this service reads or writes (an API's databases)."""
    notes: str = ""


MAX_PROMOTE_LAG_S = 30.0
"""A replica may be promoted only if it is healthy and at most this far behind its primary."""

INCIDENT_CHANNEL = "#incident-bridge"

SERVICES: list[Service] = [
    # payments: the primary in eu-west-1 is down (the incident); eu-central-1 has a healthy replica.
    Service(name="payments-db-eu-west", cluster="payments-db", kind="database", region="eu-west-1", role="primary",
            health="down", holds_data=True, notes="storage controller failure since 09:12 UTC; no writes accepted"),
    Service(name="payments-db-eu-central", cluster="payments-db", kind="database", region="eu-central-1",
            role="replica", health="healthy", replica_of="payments-db-eu-west", lag_s=4.0, holds_data=True),
    Service(name="payments-db-eu-west-r2", cluster="payments-db", kind="database", region="eu-west-1",
            role="replica", health="degraded", replica_of="payments-db-eu-west", lag_s=310.0, holds_data=True,
            notes="same storage array as the primary; replication stalled"),
    # ledger: healthy, with a close replica in the other region.
    Service(name="ledger-db-eu-west", cluster="ledger-db", kind="database", region="eu-west-1", role="primary",
            health="healthy", holds_data=True),
    Service(name="ledger-db-eu-central", cluster="ledger-db", kind="database", region="eu-central-1",
            role="replica", health="healthy", replica_of="ledger-db-eu-west", lag_s=2.0, holds_data=True),
    # cards: the primary is degraded and its only replica is too far behind to promote.
    Service(name="cards-db-eu-central", cluster="cards-db", kind="database", region="eu-central-1", role="primary",
            health="degraded", holds_data=True, notes="p99 write latency 4 s"),
    Service(name="cards-db-eu-west", cluster="cards-db", kind="database", region="eu-west-1", role="replica",
            health="degraded", replica_of="cards-db-eu-central", lag_s=95.0, holds_data=True),
    # APIs: active in eu-west-1, warm standby in eu-central-1.
    Service(name="payments-api-eu-west", cluster="payments-api", kind="api", region="eu-west-1", role="active",
            health="degraded", depends_on=["payments-db"], notes="5xx on writes: its database is down"),
    Service(name="payments-api-eu-central", cluster="payments-api", kind="api", region="eu-central-1",
            role="standby", health="healthy", depends_on=["payments-db"]),
    Service(name="ledger-api-eu-west", cluster="ledger-api", kind="api", region="eu-west-1", role="active",
            health="healthy", depends_on=["ledger-db", "payments-db"]),
    Service(name="ledger-api-eu-central", cluster="ledger-api", kind="api", region="eu-central-1", role="standby",
            health="healthy", depends_on=["ledger-db", "payments-db"]),
    Service(name="card-auth-eu-west", cluster="card-auth", kind="api", region="eu-west-1", role="active",
            health="degraded", depends_on=["cards-db", "payments-db"], notes="timeouts on payment holds"),
    Service(name="card-auth-eu-central", cluster="card-auth", kind="api", region="eu-central-1", role="standby",
            health="healthy", depends_on=["cards-db", "payments-db"]),
    Service(name="dns", cluster="dns", kind="dns", region="global", role="global", health="healthy",
            notes="records: api.keel-bank.example -> eu-west-1; <cluster>.db.keel.internal -> each database primary; "
                  "TTL 300 s"),
]

SERVICES_BY_NAME: dict[str, Service] = {s.name: s for s in SERVICES}


def resolve_target(target: str, services: list[Service]) -> list[Service]:
    """The services a step's target names: one service by name, or every member of a cluster."""
    t = target.strip().lower()
    exact = [s for s in services if s.name == t]
    return exact or [s for s in services if s.cluster == t]


def service_status(name: str | None, services: list[Service] | None = None) -> list[Service] | None:
    """Every service, or those one name (service or cluster) names; None if it names nothing."""
    services = SERVICES if services is None else services
    if name is None or not name.strip():
        return list(services)
    return resolve_target(name, services) or None


# --- runbooks ------------------------------------------------------------------------------


class Runbook(BaseModel):
    topic: str
    title: str
    summary: str
    steps: list[str]
    """Ordered guidance: what a plan does, in this order."""
    rules: list[str]
    """Ids of the RULES a plan on this topic is checked against."""


ALL_RULE_IDS = ["notify_first", "snapshot_before_promote", "no_destructive_on_data", "rollback_named",
                "health_check_after_cutover", "promote_healthy_replica"]

RUNBOOKS: dict[str, Runbook] = {r.topic: r for r in [
    Runbook(
        topic="database_failover",
        title="Fail a database cluster over to a replica",
        summary="The primary of a database cluster is down or unfit; a replica takes over as primary.",
        steps=[
            f"notify: declare the incident in {INCIDENT_CHANNEL}, name the incident commander and the cluster.",
            "Confirm the primary is down from two sources (service status and a synthetic check); never fail over "
            "on a single alarm.",
            "freeze_writes: put the APIs that write to the cluster in read-only mode.",
            "snapshot: take a storage snapshot of the replica you will promote (the restore point).",
            f"Choose the replica: healthy, lag at most {MAX_PROMOTE_LAG_S:.0f} s, preferably in another region.",
            "promote: promote that replica to primary; fence the old primary (never delete it: forensics).",
            "dns_cutover: repoint <cluster>.db.keel.internal to the new primary.",
            "health_check: run a synthetic transaction through every writing API; watch error rates for 5 min.",
            "unfreeze_writes: lift the read-only mode.",
            f"notify: post the all-clear in {INCIDENT_CHANNEL} and open the postmortem.",
        ],
        rules=list(ALL_RULE_IDS),
    ),
    Runbook(
        topic="region_evacuation",
        title="Evacuate a region",
        summary="A region is unfit to serve; every active service and database primary moves to the other one.",
        steps=[
            f"notify: declare the incident in {INCIDENT_CHANNEL}; say which region is evacuated.",
            "freeze_writes: read-only mode on the APIs of the region.",
            "For each database whose primary is in the region: snapshot the replica in the other region, then "
            "promote it (healthy, lag within the limit).",
            "scale_up: bring the standby APIs of the other region to full capacity.",
            "shift_traffic: point api.keel-bank.example at the other region.",
            "health_check: synthetic transactions through every API; error rates for 5 min.",
            "unfreeze_writes, then notify: all-clear and postmortem.",
        ],
        rules=list(ALL_RULE_IDS),
    ),
    Runbook(
        topic="dns_cutover",
        title="Move public traffic to the other region",
        summary="api.keel-bank.example moves to the standby region (APIs only; databases stay where they are).",
        steps=[
            f"notify: announce the cutover in {INCIDENT_CHANNEL}.",
            "lower_ttl: lower the record's TTL to 60 s and wait one old TTL.",
            "dns_cutover: point api.keel-bank.example at the standby region.",
            "health_check: synthetic transactions through the standby region's APIs.",
            "restore_ttl: set the TTL back to 300 s.",
            f"notify: report the result in {INCIDENT_CHANNEL}.",
        ],
        rules=["notify_first", "no_destructive_on_data", "rollback_named", "health_check_after_cutover"],
    ),
]}


def normalize_topic(topic: str) -> str:
    return re.sub(r"[\s\-]+", "_", topic.strip().lower())


# --- plans and rules -----------------------------------------------------------------------


class PlanStep(BaseModel):
    """One step of a recovery plan, as the worker agent writes it."""

    action: str
    """A short verb, e.g. notify, snapshot, promote, dns_cutover, health_check."""
    target: str = ""
    """A service or cluster name (get_service_status), a channel, or a DNS record."""
    detail: str = ""
    rollback: str = ""
    """How to undo this step if it goes wrong."""
    verify: str = ""
    """How to know the step worked."""


class StepMatch(BaseModel):
    """Which steps a rule is about. Empty criteria match everything; given ones must all hold."""

    actions: list[str] = Field(default_factory=list)
    """Any one matches: a fragment at the start of a word of the action (lowercased, words joined by
    underscores), so "promote" matches "promote_replica" and "cutover" matches "dns_cutover"."""
    target_kinds: list[ServiceKind] = Field(default_factory=list)
    """The target must resolve to a service of one of these kinds."""
    holds_data: bool | None = None
    """True: the target holds production data (or is no known service: assumed to)."""
    mentions: list[str] = Field(default_factory=list)
    """Any one of these substrings in the target or the detail (lowercased)."""


class TargetState(BaseModel):
    """What the target of a step must be, from the service status."""

    role: ServiceRole | None = None
    health: list[Health] = Field(default_factory=list)
    max_lag_s: float | None = None


RuleCheck = Literal["first_step", "precedes", "never", "requires_field", "followed_by", "target_state"]


class StepRule(BaseModel):
    """A deterministic rule over a plan. What `check` means:

    - first_step: the plan's first step matches `require`.
    - precedes: every step matching `when` has an earlier step matching `require` (on the same
      cluster with `same_cluster`).
    - never: no step matches `when`.
    - requires_field: every step matching `when` has a real value in `field`.
    - followed_by: every step matching `when` is followed, within `within` steps, by one matching `require`.
    - target_state: every step matching `when` targets exactly one service in the `state`.
    """

    id: str
    description: str
    check: RuleCheck
    when: StepMatch = Field(default_factory=StepMatch)
    require: StepMatch | None = None
    same_cluster: bool = False
    field: Literal["action", "target", "detail", "rollback", "verify"] | None = None
    within: int = Field(1, ge=1)
    state: TargetState | None = None


DESTRUCTIVE = ["drop", "delete", "truncate", "wipe", "destroy", "purge", "erase", "rm"]
PROMOTE = ["promote", "failover", "fail_over"]
CUTOVER = ["cutover", "cut_over", "repoint", "shift_traffic", "reroute", "switch_traffic", "dns_update",
           "update_dns"]
HEALTH_CHECK = ["health_check", "healthcheck", "smoke_test", "synthetic", "verify", "check"]
PLACEHOLDERS = {"", "-", "?", "none", "n/a", "na", "tbd", "todo", "nothing", "no rollback", "not applicable"}
"""Values that do not name a rollback (or a verification)."""

RULES: list[StepRule] = [
    StepRule(id="notify_first",
         description=f"The first step notifies the incident channel ({INCIDENT_CHANNEL}).",
         check="first_step",
         require=StepMatch(actions=["notify", "page", "announce", "declare"], mentions=["incident"])),
    StepRule(id="snapshot_before_promote",
         description="A snapshot or backup of a database precedes any promotion or failover of it.",
         check="precedes",
         when=StepMatch(actions=PROMOTE),
         require=StepMatch(actions=["snapshot", "backup"], target_kinds=["database"]),
         same_cluster=True),
    StepRule(id="no_destructive_on_data",
         description="No destructive action (drop, delete, truncate, wipe, ...) on production data.",
         check="never",
         when=StepMatch(actions=DESTRUCTIVE, holds_data=True)),
    StepRule(id="rollback_named",
         description="Every step names its rollback.",
         check="requires_field",
         field="rollback"),
    StepRule(id="health_check_after_cutover",
         description="A DNS or traffic cutover is followed at once by a health check.",
         check="followed_by",
         when=StepMatch(actions=CUTOVER),
         require=StepMatch(actions=HEALTH_CHECK),
         within=1),
    StepRule(id="promote_healthy_replica",
         description=f"The replica promoted is healthy, with lag at most {MAX_PROMOTE_LAG_S:.0f} s (service status).",
         check="target_state",
         when=StepMatch(actions=PROMOTE),
         state=TargetState(role="replica", health=["healthy"], max_lag_s=MAX_PROMOTE_LAG_S)),
]

RULES_BY_ID: dict[str, StepRule] = {r.id: r for r in RULES}


def rules_for(topic: str) -> list[StepRule]:
    """The rules of a runbook (all of them for an unknown topic: the strictest reading)."""
    book = RUNBOOKS.get(normalize_topic(topic))
    ids = book.rules if book is not None else ALL_RULE_IDS
    return [RULES_BY_ID[i] for i in ids]


class Violation(BaseModel):
    step: int
    """1-based, as the plan numbers its steps; 0 for the plan as a whole."""
    rule: str
    message: str

    def line(self) -> str:
        where = f"step {self.step}" if self.step else "plan"
        return f"[{self.rule}] {where}: {self.message}"


def _norm_action(action: str) -> str:
    return re.sub(r"[\W_]+", "_", action.strip().lower()).strip("_")


def _label(step: PlanStep) -> str:
    return f"{step.action} {step.target}".strip()


def matches(m: StepMatch, step: PlanStep, services: list[Service]) -> bool:
    action = f"_{_norm_action(step.action)}"
    if m.actions and not any(f"_{a}" in action for a in m.actions):
        return False
    resolved = resolve_target(step.target, services)
    if m.target_kinds and not any(s.kind in m.target_kinds for s in resolved):
        return False
    if m.holds_data is not None:
        # A target that is no known service might be anything: treated as production data.
        data = any(s.holds_data for s in resolved) if resolved else True
        if data != m.holds_data:
            return False
    if m.mentions:
        text = f"{step.target} {step.detail}".lower()
        if not any(x in text for x in m.mentions):
            return False
    return True


def _clusters(step: PlanStep, services: list[Service]) -> set[str]:
    return {s.cluster for s in resolve_target(step.target, services)} or {step.target.strip().lower()}


def _state_problem(step: PlanStep, state: TargetState, services: list[Service]) -> str | None:
    found = resolve_target(step.target, services)
    if not found:
        return f"{step.target!r} is no known service; name the replica (get_service_status)"
    if len(found) > 1:
        return f"{step.target!r} is a cluster of {len(found)} services; name the one replica to promote"
    s = found[0]
    problems = []
    if state.role is not None and s.role != state.role:
        problems.append(f"is a {s.role}, not a {state.role}")
    if state.health and s.health not in state.health:
        problems.append(f"is {s.health}")
    if state.max_lag_s is not None and s.role == "replica" and (s.lag_s is None or s.lag_s > state.max_lag_s):
        lag = "an unknown time" if s.lag_s is None else f"{s.lag_s:g} s"
        problems.append(f"lags {lag} behind its primary (limit {state.max_lag_s:g} s)")
    return f"{s.name} " + " and ".join(problems) if problems else None


def _check(rule: StepRule, steps: list[PlanStep], services: list[Service]) -> list[Violation]:
    out: list[Violation] = []

    def flag(i: int, message: str) -> None:
        out.append(Violation(step=i + 1 if i >= 0 else 0, rule=rule.id, message=message))

    def hit(m: StepMatch | None, step: PlanStep) -> bool:
        return m is None or matches(m, step, services)

    if rule.check == "first_step":
        if not steps:
            flag(-1, f"the plan has no steps; {rule.description[0].lower()}{rule.description[1:]}")
        elif not hit(rule.require, steps[0]):
            flag(0, f"the first step is {_label(steps[0])!r}; {rule.description[0].lower()}{rule.description[1:]}")
        return out
    for i, step in enumerate(steps):
        if not hit(rule.when, step):
            continue
        if rule.check == "never":
            flag(i, f"{_label(step)!r} is not allowed: {rule.description}")
        elif rule.check == "requires_field":
            field = rule.field or "rollback"
            value = str(getattr(step, field)).strip().lower().rstrip(".")
            if value in PLACEHOLDERS:
                flag(i, f"{_label(step)!r} names no {field}")
        elif rule.check == "precedes":
            earlier = [s for s in steps[:i] if hit(rule.require, s)]
            if rule.same_cluster:
                mine = _clusters(step, services)
                earlier = [s for s in earlier if _clusters(s, services) & mine]
            if not earlier:
                what = "/".join((rule.require.actions if rule.require else []) or ["the required step"])
                of = f" of {', '.join(sorted(_clusters(step, services)))}" if rule.same_cluster else ""
                flag(i, f"no {what}{of} before {_label(step)!r}")
        elif rule.check == "followed_by":
            window = steps[i + 1: i + 1 + rule.within]
            if not any(hit(rule.require, s) for s in window):
                nxt = f"the next step is {_label(window[0])!r}" if window else "it is the last step"
                what = "/".join((rule.require.actions if rule.require else [])[:2]) or "the required step"
                flag(i, f"{_label(step)!r} is not followed by a {what}; {nxt}")
        elif rule.check == "target_state" and rule.state is not None:
            problem = _state_problem(step, rule.state, services)
            if problem is not None:
                flag(i, f"cannot {step.action} {step.target}: {problem}")
    return out


def check_plan(steps: list[PlanStep], rules: list[StepRule], services: list[Service]) -> list[Violation]:
    """Every violation of `rules` in the plan, by step then rule order. Deterministic and pure."""
    found = [v for rule in rules for v in _check(rule, steps, services)]
    order = {r.id: k for k, r in enumerate(rules)}
    return sorted(found, key=lambda v: (v.step, order[v.rule]))
