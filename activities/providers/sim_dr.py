"""The sim model's answers for the 'dr/*' prompts: the supervisor pattern's worker and reviewer.

Deterministic: every answer depends only on the request (the messages, the offered tools, `req.model.sim.seed`).

`dr/plan` (the worker, an agent loop with get_service_status and lookup_runbook):
- first it calls get_service_status (all services), then lookup_runbook(<the task's runbook>), reading
  the task from its first user message (`Task: Runbook: <topic>\\nScenario: <text>`);
- then it answers with the plan as one JSON object {"summary", "steps": [{action, target, detail,
  rollback, verify}]}, built from the runbook's order and the status it read: the failing database
  cluster is the one the scenario names (else the first whose primary is not healthy); the replica it
  promotes is the best one (healthy first, then the lowest lag);
- its FIRST draft (no supervisor feedback in the messages) has the mistake people make most on that
  runbook: database_failover and region_evacuation leave out the snapshot before promoting a replica
  (rule snapshot_before_promote), dns_cutover leaves out the health check after the cutover (rule
  health_check_after_cutover). With `Random(f"{seed}:dr:verify").random() < 0.5` (seeds 1, 5, 7, 10,
  ...; not 0, 2, 3, 4) the draft's cutover step also names no verification: no rule catches that,
  only the reviewer;
- with feedback (a `Context: Supervisor feedback on round N: ...` message, after a `Context: Your
  previous plan (round N): {json}` one) it revises its previous plan and fixes exactly the problems
  named: `[<rule id>] step N: ...` lines (snapshot inserted before the step, health check inserted after
  it, rollback or first notification added, destructive step removed, promotion moved to a fitting
  replica if there is one) and `[review] step N (...): no verification ...` lines (a verification
  added). A problem it cannot fix (no replica fit to promote) stays.
- told to answer now (budget) or offered no tools, it answers with the plan from what it has read.
- `req.model.sim.invalid_json_rate`: the chance that its plan is not valid JSON (cut off midway, as at an
  output limit), except when the feedback names the invalid output (`[valid_plan]`): then it
  answers with a fresh, complete plan.

`dr/review` (the reviewer, one JSON call of the supervisor): reads `Plan: {json}` and `Rule check:
{json}` from its messages and answers {"verdict", "feedback"}:
- escalate if the rules found that no replica may be promoted (promote_healthy_replica): choosing
  one is a data-loss decision for a human;
- revise if there are rule violations, if the plan is not valid, or if a step names no verification
  (its own concern, feedback `step N (action target): no verification named; ...`);
- accept otherwise.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from activities.providers.sim import parse_calls
from keel.runbooks import INCIDENT_CHANNEL, MAX_PROMOTE_LAG_S, SERVICES, Service
from keel.supervisor import INVALID_PLAN
from keel.types import LlmRequest, Message, ToolCall

Step = dict[str, str]


def respond(req: LlmRequest, rng: random.Random) -> tuple[str, list[ToolCall]]:
    if req.prompt.endswith("/review"):
        return review(req.messages), []
    return _worker(req, rng)


# --- reading the conversation -----------------------------------------------------------------


def _task(messages: list[Message]) -> tuple[str, str]:
    """(runbook topic, scenario) from the first user message."""
    first = next((m.content for m in messages if m.role == "user"), "")
    topic = re.search(r"Runbook:\s*([\w\-]+)", first)
    scenario = re.search(r"Scenario:\s*(.*?)(?:\n\n|$)", first, re.DOTALL)
    return (topic.group(1).lower() if topic else "database_failover"), (scenario.group(1).strip() if scenario else "")


def _context(messages: list[Message], prefix: str) -> str | None:
    head = f"Context: {prefix}"
    return next((m.content for m in reversed(messages) if m.role == "user" and m.content.startswith(head)), None)


def _previous_plan(messages: list[Message]) -> list[Step] | None:
    text = _context(messages, "Your previous plan")
    if text is None:
        return None
    start = text.find("{")
    try:
        value = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None
    steps = value.get("steps") if isinstance(value, dict) else None
    if not isinstance(steps, list):
        return None
    return [{k: str(s.get(k, "")) for k in ("action", "target", "detail", "rollback", "verify")}
            for s in steps if isinstance(s, dict)]


def _services(messages: list[Message]) -> list[Service]:
    """The services the status tool returned, or (never looked up) what the model already knows."""
    for call in reversed(parse_calls(messages)):
        if call.name == "get_service_status" and call.ok and call.result:
            raw = call.result.get("services")
            if isinstance(raw, list):
                return [Service.model_validate(s) for s in raw if isinstance(s, dict)]
    return list(SERVICES)


# --- the worker -------------------------------------------------------------------------------


def _worker(req: LlmRequest, rng: random.Random) -> tuple[str, list[ToolCall]]:
    topic, scenario = _task(req.messages)
    offered = {t.name for t in req.tools} | set(req.tool_names)
    answer_now = any(m.role == "system" and "answer now" in m.content.lower() for m in req.messages)
    if offered and not answer_now:
        done = {c.name for c in parse_calls(req.messages)}
        for name, args in (("get_service_status", {}), ("lookup_runbook", {"topic": topic})):
            if name in offered and name not in done:
                return "", [ToolCall(id=f"call_{req.step}_0", name=name, arguments_json=json.dumps(args))]
    services = _services(req.messages)
    feedback = _context(req.messages, "Supervisor feedback")
    previous = _previous_plan(req.messages)
    if feedback is not None and previous is not None:
        steps = revise(previous, feedback, services)
        summary = f"Revised {topic.replace('_', ' ')} plan: fixed what the supervisor named."
    else:
        steps = draft(topic, scenario, services, omit_verify=_omits_verify(req.model.sim.seed),
                      flawed=feedback is None)
        summary = f"{topic.replace('_', ' ').capitalize()} plan for: {scenario[:200]}"
    text = json.dumps({"summary": summary, "steps": steps})
    if rng.random() < req.model.sim.invalid_json_rate and not (feedback and f"[{INVALID_PLAN}]" in feedback):
        text = text[: int(len(text) * (0.3 + 0.4 * rng.random()))]  # cut off: never valid JSON
    return text, []


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
_NO_VERIFY = re.compile(r"\[review\]\s+step\s+(\d+)\b[^\n]*no verification", re.I)


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


# --- the reviewer -----------------------------------------------------------------------------


def _message_json(messages: list[Message], prefix: str) -> dict[str, Any] | None:
    for m in reversed(messages):
        if m.role == "user" and m.content.startswith(prefix):
            try:
                value = json.loads(m.content[len(prefix):].strip())
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def review(messages: list[Message]) -> str:
    plan = _message_json(messages, "Plan:")
    check = _message_json(messages, "Rule check:") or {}
    violations = [v for v in check.get("violations", []) if isinstance(v, dict)]
    if plan is None or "steps" not in plan:
        return json.dumps({"verdict": "revise", "feedback": [
            "the worker's output is not a plan: answer with the JSON object the instructions describe"]})
    unfit = [v for v in violations if v.get("rule") == "promote_healthy_replica"]
    if unfit:
        return json.dumps({"verdict": "escalate", "feedback": [
            f"no replica is fit to promote ({unfit[0].get('message')}); promoting one anyway risks losing "
            "committed transactions: a human must decide"]})
    concerns = [f"step {i} ({s.get('action')} {s.get('target')}): no verification named; say how you will know "
                "it worked" for i, s in enumerate(plan.get("steps", []), 1)
                if isinstance(s, dict) and not str(s.get("verify", "")).strip()]
    if violations or concerns:
        head = [f"fix the {len(violations)} rule violation(s) of the rule check"] if violations else []
        return json.dumps({"verdict": "revise", "feedback": head + concerns})
    return json.dumps({"verdict": "accept", "feedback": [
        "the plan follows the runbook's order; every step names a rollback and a verification"]})
