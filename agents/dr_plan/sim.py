"""How the offline sim model plays the disaster-recovery planner and its reviewer.

Deterministic: every answer depends only on the turn (the input, the context, the calls made, the seed).

`dr_planner` (the worker):
- first it calls get_service_status (all services), then lookup_runbook(<the task's runbook>), reading
  the task from its input (`Runbook: <topic>\nScenario: <text>`);
- then it answers the plan as one JSON object {"summary", "steps": [{action, target, detail, rollback,
  verify}]}, built from the runbook's order and the status it read: the failing database cluster is
  the one the scenario names (else the first whose primary is not healthy); the replica it promotes
  is the best one (healthy first, then the lowest lag);
- its FIRST draft (not sent back yet) has the mistake people make most on that runbook:
  database_failover and region_evacuation leave out the snapshot before promoting a replica (rule
  snapshot_before_promote), dns_cutover leaves out the health check after the cutover (rule
  health_check_after_cutover). With `Random(f"{seed}:dr:verify").random() < 0.5` (seeds 1, 5, 7, 10,
  ...; not 0, 2, 3, 4) the draft's cutover step also names no verification: no rule catches that,
  only the reviewer;
- sent back (the supervisor's context `Your previous answer (round N): {json}` and `It was sent back;
  fix every point ...: <reasons>`), it revises its previous plan and fixes exactly the problems
  named: `[<rule id>] step N: ...` violations (snapshot inserted before the step, health check
  inserted after it, rollback or first notification added, destructive step removed, promotion moved
  to a fitting replica if there is one) and the reviewer's `step N (...): no verification ...`
  issues (a verification added). A problem it cannot fix (no replica fit to promote) stays.
- told to answer now (budget) or offered no tools, it answers with the plan from what it has read.

`dr_reviewer` reads the plan from its context (`The answer to review: {json}`) and answers a
keel.Review: not approved, with one issue per step that names no verification; approved otherwise.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from agents.dr_plan.runbooks import INCIDENT_CHANNEL, MAX_PROMOTE_LAG_S, SERVICES, Service
from keel import SimReply, SimTurn

Step = dict[str, str]
PREVIOUS = "Your previous answer"
SENT_BACK = "It was sent back"
TO_REVIEW = "The answer to review:"


# --- reading the turn --------------------------------------------------------------------------


def _task(text: str) -> tuple[str, str]:
    """(runbook topic, scenario) from the input."""
    topic = re.search(r"Runbook:\s*([\w\-]+)", text)
    scenario = re.search(r"Scenario:\s*(.*?)(?:\n\n|$)", text, re.DOTALL)
    return (topic.group(1).lower() if topic else "database_failover"), (scenario.group(1).strip() if scenario else "")


def _context(turn: SimTurn, prefix: str) -> str | None:
    return next((c for c in reversed(turn.context) if c.startswith(prefix)), None)


def _json_after(text: str | None) -> dict[str, Any] | None:
    if text is None or "{" not in text:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[text.find("{"):])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _steps(plan: dict[str, Any] | None) -> list[Step] | None:
    steps = plan.get("steps") if plan is not None else None
    if not isinstance(steps, list):
        return None
    return [{k: str(s.get(k, "")) for k in ("action", "target", "detail", "rollback", "verify")}
            for s in steps if isinstance(s, dict)]


def _services(turn: SimTurn) -> list[Service]:
    """The services the status tool returned, or (never looked up) what the model already knows."""
    for call in reversed(turn.called("get_service_status")):
        raw = (call.result or {}).get("services") if call.ok else None
        if isinstance(raw, list):
            return [Service.model_validate(s) for s in raw if isinstance(s, dict)]
    return list(SERVICES)


# --- the planner -------------------------------------------------------------------------------


def planner_sim(turn: SimTurn) -> SimReply:
    topic, scenario = _task(turn.input)
    if not turn.answer_now:
        for name, args in (("get_service_status", {}), ("lookup_runbook", {"topic": topic})):
            if turn.offered(name) and not turn.called(name):
                return SimReply.call(name, **args)
    services = _services(turn)
    feedback = _context(turn, SENT_BACK)
    previous = _steps(_json_after(_context(turn, PREVIOUS)))
    if feedback is not None and previous:
        steps = revise(previous, feedback, services)
        summary = f"Revised {topic.replace('_', ' ')} plan: fixed what the supervisor named."
    else:
        steps = draft(topic, scenario, services, omit_verify=_omits_verify(turn.seed), flawed=feedback is None)
        summary = f"{topic.replace('_', ' ').capitalize()} plan for: {scenario[:200]}"
    return SimReply.answer(json.dumps({"summary": summary, "steps": steps}))


def _omits_verify(seed: int) -> bool:
    return random.Random(f"{seed}:dr:verify").random() < 0.5


def _step(action: str, target: str, detail: str, rollback: str, verify: str) -> Step:
    return {"action": action, "target": target, "detail": detail, "rollback": rollback, "verify": verify}


def _cluster(scenario: str, services: list[Service]) -> str:
    low = scenario.lower()
    dbs = [s for s in services if s.kind == "database"]
    named = sorted(((low.find(s.cluster), s.cluster) for s in dbs if s.cluster in low), key=lambda x: x[0])
    if not named:
        # "payments database", "the cards db": the cluster's first word next to "db"/"database"
        named = sorted(((low.find(w), s.cluster) for s in dbs for w in [s.cluster.split("-")[0]]
                        if re.search(rf"\b{re.escape(w)}\b.{{0,12}}\b(db|database)", low)), key=lambda x: x[0])
    if named:
        return named[0][1]
    down = [s for s in dbs if s.role == "primary" and s.health != "healthy"]
    return (down or dbs or SERVICES[:1])[0].cluster


def _primary(cluster: str, services: list[Service]) -> Service | None:
    return next((s for s in services if s.cluster == cluster and s.role == "primary"), None)


def best_replica(cluster: str, services: list[Service], avoid_region: str | None = None) -> Service | None:
    replicas = [s for s in services if s.cluster == cluster and s.role == "replica"]
    replicas.sort(key=lambda s: (s.health != "healthy", s.lag_s if s.lag_s is not None else 1e9,
                                 s.region == avoid_region, s.name))
    return replicas[0] if replicas else None


def _writers(cluster: str, services: list[Service], region: str | None = None) -> list[str]:
    return sorted(s.name for s in services if s.kind == "api" and s.role == "active" and cluster in s.depends_on
                  and (region is None or s.region == region))


def _snapshot(replica: str) -> Step:
    return _step("snapshot", replica, f"Take a storage snapshot of {replica}: the restore point before promotion.",
                 f"Keep the snapshot; if the promotion fails, restore {replica} from it.",
                 "The snapshot is complete and listed with its log position.")


def _promote(replica: Service, primary: str) -> Step:
    return _step("promote", replica.name,
                 f"Promote {replica.name} ({replica.region}, lag {replica.lag_s:g} s) to primary; fence {primary} so "
                 f"it cannot take writes when it returns (keep it for forensics, never delete it).",
                 f"Restore {replica.name} from its snapshot and re-attach it as a replica; unfence {primary} once "
                 "it is healthy.",
                 f"{replica.name} reports role primary and accepts a test write.")


def _health_check(targets: str) -> Step:
    return _step("health_check", targets, f"Run a synthetic transaction through {targets}; watch 5xx and latency "
                 "for 5 minutes.", "If it fails, roll back the cutover before it and keep writes frozen.",
                 "The synthetic transaction succeeds and the 5xx rate stays under 0.1%.")


def _notify(detail: str, closing: bool = False) -> Step:
    if closing:
        return _step("notify", INCIDENT_CHANNEL, detail, "Post a correction in the channel if errors return.",
                     "The postmortem ticket is open and linked in the channel.")
    return _step("notify", INCIDENT_CHANNEL, detail, "Post a stand-down in the incident channel if the plan is "
                 "called off.", "The incident commander acknowledges in the channel.")


def _freeze(target: str, apis: str) -> list[Step]:
    return [
        _step("freeze_writes", target, f"Put {apis} in read-only mode (writes get 503 with Retry-After).",
              f"Lift read-only mode on {apis}.", "Writes return 503 read-only; reads still succeed."),
        _step("unfreeze_writes", target, f"Lift read-only mode on {apis}.", "Re-enable read-only mode.",
              "The write success rate is back above 99.9%."),
    ]


def draft(topic: str, scenario: str, services: list[Service], omit_verify: bool = False,
          flawed: bool = True) -> list[Step]:
    """A full plan for the topic; `flawed`: with the first draft's mistake (see the module docstring)."""
    if topic == "dns_cutover":
        steps = _dns_cutover(services, flawed)
    elif topic == "region_evacuation":
        steps = _region_evacuation(scenario, services, flawed)
    else:
        steps = _database_failover(scenario, services, flawed)
    if flawed and omit_verify:
        for s in steps:
            if s["action"] in ("dns_cutover", "shift_traffic"):
                s["verify"] = ""
    return steps


def _database_failover(scenario: str, services: list[Service], flawed: bool) -> list[Step]:
    cluster = _cluster(scenario, services)
    primary = _primary(cluster, services)
    pname = primary.name if primary else f"the {cluster} primary"
    replica = best_replica(cluster, services, primary.region if primary else None)
    writers = _writers(cluster, services) or [f"the APIs writing to {cluster}"]
    apis = ", ".join(writers)
    freeze, unfreeze = _freeze(", ".join(sorted({w.rsplit("-", 2)[0] for w in writers})), apis)
    state = f"{primary.health}" if primary else "failing"
    steps = [
        _notify(f"Declare SEV1: {pname} is {state}; failing {cluster} over to "
                f"{replica.name if replica else 'a replica'}. Incident commander: the on-call SRE."),
        _step("confirm_outage", pname, f"Confirm {pname} is down from the service status and a synthetic write; "
              "never fail over on a single alarm.", "Nothing to undo: read-only checks.",
              f"Both sources agree {pname} accepts no writes."),
        freeze,
    ]
    if replica is not None:
        if not flawed:
            steps.append(_snapshot(replica.name))
        steps.append(_promote(replica, pname))
        target = replica.name
    else:
        target = "a new primary"
    steps += [
        _step("dns_cutover", "dns", f"Repoint {cluster}.db.keel.internal from {pname} to {target} (TTL 300 s).",
              f"Point {cluster}.db.keel.internal back to {pname}.",
              f"{cluster}.db.keel.internal resolves to {target} from both regions."),
        _health_check(apis),
        unfreeze,
        _notify(f"All clear: {cluster} is served by {target}; open the postmortem.", closing=True),
    ]
    return steps


def _region_evacuation(scenario: str, services: list[Service], flawed: bool) -> list[Step]:
    m = re.search(r"\b[a-z]{2}-[a-z]+-\d\b", scenario.lower())
    down = next((s.region for s in services if s.health == "down"), "eu-west-1")
    region = m.group(0) if m else down
    others = sorted({s.region for s in services if s.region not in (region, "global")})
    to = others[0] if others else "the other region"
    apis = sorted(s.name for s in services if s.kind == "api" and s.role == "active" and s.region == region)
    steps = [_notify(f"Declare SEV1: evacuating {region} to {to}. Incident commander: the on-call SRE.")]
    freeze, unfreeze = _freeze(region, ", ".join(apis) or f"the APIs in {region}")
    steps.append(freeze)
    for p in sorted((s for s in services if s.kind == "database" and s.role == "primary" and s.region == region),
                    key=lambda s: s.name):
        replica = best_replica(p.cluster, services, region)
        if replica is None:
            continue
        if not flawed:
            steps.append(_snapshot(replica.name))
        steps.append(_promote(replica, p.name))
    for api in apis:
        standby = next((s for s in services if s.cluster == api.rsplit("-", 2)[0] and s.role == "standby"
                        and s.region == to), None)
        if standby is not None:
            steps.append(_step("scale_up", standby.name, f"Scale {standby.name} to full capacity.",
                               f"Scale {standby.name} back to standby size.",
                               f"{standby.name} runs at full capacity with healthy instances."))
    steps += [
        _step("shift_traffic", "dns", f"Point api.keel-bank.example and the database records at {to}.",
              f"Point the records back at {region}.", f"The records resolve to {to} from both regions."),
        _health_check(f"the APIs in {to}"),
        unfreeze,
        _notify(f"All clear: {region} evacuated to {to}; open the postmortem.", closing=True),
    ]
    return steps


def _dns_cutover(services: list[Service], flawed: bool) -> list[Step]:
    standby = sorted({s.region for s in services if s.role == "standby"})
    to = standby[0] if standby else "the standby region"
    steps = [
        _notify(f"Announce: moving api.keel-bank.example to {to}."),
        _step("lower_ttl", "dns", "Lower the TTL of api.keel-bank.example to 60 s; wait 300 s (one old TTL).",
              "Set the TTL back to 300 s.", "The record's TTL reads 60 s from both regions."),
        _step("dns_cutover", "dns", f"Point api.keel-bank.example at {to}.",
              "Point api.keel-bank.example back at its previous region.",
              f"api.keel-bank.example resolves to {to} from both regions."),
    ]
    if not flawed:
        steps.append(_health_check(f"the APIs in {to}"))
    steps += [
        _step("restore_ttl", "dns", "Set the TTL of api.keel-bank.example back to 300 s.", "Lower it to 60 s again.",
              "The record's TTL reads 300 s."),
        _notify(f"Cutover done: api.keel-bank.example serves from {to}.", closing=True),
    ]
    return steps


_VIOLATION = re.compile(r"\[(\w+)\]\s+step\s+(\d+)")
_NO_VERIFY = re.compile(r"\bstep\s+(\d+)\s+\([^)]*\):\s*no verification", re.I)


def revise(previous: list[Step], feedback: str, services: list[Service]) -> list[Step]:
    """The previous plan with exactly the named problems fixed."""
    named: dict[int, set[str]] = {}
    for rule, n in _VIOLATION.findall(feedback):
        named.setdefault(int(n), set()).add(rule)
    for n in _NO_VERIFY.findall(feedback):
        named.setdefault(int(n), set()).add("verify")
    out: list[Step] = []
    for i, step in enumerate(previous, 1):
        s = dict(step)
        fixes = named.get(i, set())
        if "no_destructive_on_data" in fixes:
            continue
        if "promote_healthy_replica" in fixes:
            found = [x for x in services if x.name == s["target"] or x.cluster == s["target"]]
            better = best_replica(found[0].cluster, services) if found else None
            if better is not None and better.health == "healthy" and (better.lag_s or 0) <= MAX_PROMOTE_LAG_S:
                s = {**s, "target": better.name, "detail": s["detail"].replace(step["target"], better.name)}
        if "snapshot_before_promote" in fixes:
            out.append(_snapshot(s["target"]))
        if "rollback_named" in fixes:
            s["rollback"] = f"Undo {s['action']} on {s['target']} and restore the state before it."
        if "verify" in fixes:
            s["verify"] = ("The record resolves to the new target from both regions." if s["action"] in
                           ("dns_cutover", "shift_traffic") else
                           f"{s['target']} shows the expected state after {s['action']}.")
        out.append(s)
        if "health_check_after_cutover" in fixes:
            out.append(_health_check("the APIs behind the cutover"))
    if any("notify_first" in f for f in named.values()):
        out.insert(0, _notify("Declare the incident and the plan to the incident commander."))
    return out


# --- the reviewer ------------------------------------------------------------------------------


def reviewer_sim(turn: SimTurn) -> SimReply:
    steps = _steps(_json_after(_context(turn, TO_REVIEW)))
    if not steps:
        return SimReply.answer(json.dumps({"approved": False, "issues": [
            "the answer is not a plan: answer with the JSON object the instructions describe"]}))
    issues = [f"step {i} ({s['action']} {s['target']}): no verification named, say how you will know it worked"
              for i, s in enumerate(steps, 1) if not s["verify"].strip()]
    return SimReply.answer(json.dumps({"approved": not issues, "issues": issues}))
