"""The user's path, as processes: `keel up --detach`, `keel ticket submit` (the support desk agent's verb),
`keel costs`, `keel down`, on free ports with a throwaway home, plus the CLI's refusals of bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keel import names
from keel.settings import KeelSettings
from starter import stack

KEEL = [sys.executable, "-m", "starter"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keel(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KEEL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env.update({
        "KEEL_HOME": str(tmp_path / ".keel"),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "KEEL_UI_PORT": str(free_port()),
        "KEEL_TASK_QUEUE": "cli-e2e",
        "KEEL_AGENTS": "agents.support_desk",  # the worker `keel up` starts serves the tickets' agent
        "COLUMNS": "200",
        # The worker's metrics endpoints default to fixed ports: tests never bind those.
        "KEEL_METRICS_PORT": "0",
        "KEEL_SDK_METRICS_PORT": "0",
    })
    yield env
    keel(env, "down", timeout=60)


def test_up_submit_costs_down(stack_env: dict[str, str], tmp_path: Path) -> None:
    up = keel(stack_env, "up", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "Temporal dev server started" in up.stdout and "worker started" in up.stdout
    state = json.loads((tmp_path / ".keel" / "stack.json").read_text())
    assert stack.alive(state["server_pid"]) and stack.alive(state["worker_pid"])

    # A second `up` reuses what runs.
    again = keel(stack_env, "up", "--detach")
    assert again.returncode == 0 and "already running" in again.stdout

    sub = keel(stack_env, "ticket", "submit", "--customer", "C-1001", "--text", "Why was I charged a fee?", "--json",
               "--spiral-rate", "0")
    assert sub.returncode == 0, sub.stderr
    doc = json.loads(sub.stdout)
    assert doc["agent"] == "support_desk" and doc["status"] == "completed", doc
    assert doc["triage"]["category"] == "billing_question" and doc["workflow_id"].startswith("support_desk-TK-")
    assert doc["tokens"] > 0 and doc["cost_usd"] > 0

    costs = keel(stack_env, "costs", "--by", "tenant,task_type", "--format", "json")
    assert costs.returncode == 0, costs.stderr
    rows = json.loads(costs.stdout)
    assert rows[0]["tenant"] == "C-1001" and rows[0]["task_type"] == "support_desk"
    assert rows[0]["cost_usd"] == pytest.approx(doc["cost_usd"])

    res = keel(stack_env, "result", doc["workflow_id"], "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["workflow_id"] == doc["workflow_id"]

    down = keel(stack_env, "down")
    assert down.returncode == 0
    assert not stack.alive(state["server_pid"]) and not stack.alive(state["worker_pid"])
    assert not (tmp_path / ".keel" / "stack.json").exists()


def test_port_held_by_something_else_is_a_clear_error(stack_env: dict[str, str]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        stack_env["TEMPORAL_ADDRESS"] = f"127.0.0.1:{squatter.getsockname()[1]}"
        out = keel(stack_env, "up", "--detach", timeout=60)
    assert out.returncode == 1
    assert "not a Temporal server" in out.stderr


def test_submit_refuses_bad_tickets(stack_env: dict[str, str]) -> None:
    empty = keel(stack_env, "ticket", "submit", "--customer", "C-1001", "--text", "  ")
    assert empty.returncode == 2 and "ticket submit refused: ticket text is empty" in empty.stderr


def test_ctrl_c_stops_everything(stack_env: dict[str, str], tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen([*KEEL, "up"], env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Press Ctrl-C" in line or not line:
            break
    assert any("Press Ctrl-C" in x for x in lines), "".join(lines)
    state = json.loads((tmp_path / ".keel" / "stack.json").read_text())
    assert stack.alive(state["server_pid"]) and stack.alive(state["worker_pid"])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    # No orphans: both children and their process groups are gone.
    assert not stack.alive(state["server_pid"]) and not stack.alive(state["worker_pid"])


def test_since_parsing() -> None:
    from datetime import UTC, datetime, timedelta

    from starter.views import parse_since

    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-11-01") == datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


FAKE_PHOENIX = '''
"""A stand-in for Arize Phoenix's server (`python -m phoenix.server.main serve`): an OTLP/HTTP receiver
on PHOENIX_HOST:PHOENIX_PORT that appends each request body to PHOENIX_WORKING_DIR/received.bin."""
import http.server
import os
import pathlib


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out = pathlib.Path(os.environ["PHOENIX_WORKING_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "received.bin", "ab") as f:
            f.write(len(body).to_bytes(4, "big") + body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    addr = (os.environ["PHOENIX_HOST"], int(os.environ["PHOENIX_PORT"]))
    http.server.ThreadingHTTPServer(addr, Handler).serve_forever()
'''


def _received_spans(path: Path) -> list[tuple[str, str, str]]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    data, spans = path.read_bytes(), []
    while data:
        n = int.from_bytes(data[:4], "big")
        req = ExportTraceServiceRequest()
        req.ParseFromString(data[4:4 + n])
        data = data[4 + n:]
        for rs in req.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            spans += [(s.name, s.trace_id.hex(), service) for ss in rs.scope_spans for s in ss.spans]
    return spans


def test_up_with_a_trace_ui_exports_one_trace_per_task(stack_env: dict[str, str], tmp_path: Path) -> None:
    """`keel up --traces phoenix` wiring, with a stand-in for Phoenix's server (the real one is an optional
    extra): started and stopped with the stack, the worker's and the starter's spans both sent to it."""
    missing = keel(stack_env, "up", "--detach", "--traces", "phoenix", timeout=60)
    if "phoenix" not in sys.modules and missing.returncode != 0:
        assert "Arize Phoenix is not installed" in missing.stderr and "[phoenix]" in missing.stderr
    fake = tmp_path / "fake"
    (fake / "phoenix" / "server").mkdir(parents=True)
    (fake / "phoenix" / "__init__.py").write_text("")
    (fake / "phoenix" / "server" / "__init__.py").write_text("")
    (fake / "phoenix" / "server" / "main.py").write_text(FAKE_PHOENIX)
    stack_env.update({"PYTHONPATH": str(fake), "KEEL_TRACING": "auto", "KEEL_PHOENIX_PORT": str(free_port()),
                      "OTEL_BSP_SCHEDULE_DELAY": "100"})
    stack_env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    up = keel(stack_env, "up", "--detach", "--traces", "phoenix")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "Phoenix started" in up.stdout and "Agent traces (Phoenix)" in up.stdout
    sub = keel(stack_env, "ticket", "submit", "--customer", "C-1001", "--text", "Why was I charged a fee?", "--json",
               "--spiral-rate", "0")
    assert sub.returncode == 0, sub.stderr
    wf = json.loads(sub.stdout)["workflow_id"]
    received = tmp_path / ".keel" / "phoenix" / "received.bin"
    deadline = time.monotonic() + 30
    spans: list[tuple[str, str, str]] = []
    while time.monotonic() < deadline:
        spans = _received_spans(received) if received.is_file() else []
        if any(n.startswith("execute_tool lookup_policy") for n, _, _ in spans):
            break
        time.sleep(0.2)
    [root] = [s for s in spans if s[0] == f"StartWorkflow:{names.AGENT_WORKFLOW}"]
    assert root[2] == "keel"  # the starter's span, exported by the `keel` command itself
    trace = [s for s in spans if s[1] == root[1]]
    assert {"keel-worker"} <= {s[2] for s in trace}
    assert any(n.startswith("chat sim-") for n, _, _ in trace)
    assert any(n.startswith("execute_tool") for n, _, _ in trace)
    assert wf
    down = keel(stack_env, "down")
    assert down.returncode == 0 and "Phoenix stopped" in down.stdout


def test_worker_gc_tuning() -> None:
    import gc

    from workers.worker import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(KeelSettings(worker_gc_threshold=0))
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
        tune_gc(KeelSettings(worker_gc_threshold=12_345))
        assert gc.get_threshold() == (12_345, *before[1:])
        assert gc.get_freeze_count() > 0  # what was loaded is out of the collections' reach
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
