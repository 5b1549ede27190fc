"""A non-editable install works: the packages pyproject.toml declares, with their package data (an agent's
prompts live beside its module), installed into a directory of their own, run the on-call agent to
completion from there, with nothing of the checkout importable.

Nothing is downloaded: the install is setuptools' own `install` command, run with the setuptools already
in the test's environment (.venv), no build isolation, no dependencies fetched. (pip would need the
`wheel` package for setuptools < 70.1 to build a wheel, and a fresh .venv has none; setuptools' install
command puts the same files in place: packages, package data, metadata, the `keel` script.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import asyncio, importlib.util, json, os, sys

    async def main():
        import activities, agents, keel, starter, workers, workflows
        from agents.oncall import oncall
        from agents.oncall.status_service import StatusService
        from keel.testing import agent_environment
        from starter.cli import app  # the command line loads the built-in agents' verbs (keel plan)

        with StatusService() as status:
            os.environ["ONCALL_STATUS_URL"] = status.url
            async with agent_environment(oncall) as env:
                result = await env.run("oncall", "Is the api service healthy?", tenant="install-check")
        report = {
            "modules": {m.__name__: m.__file__ for m in (activities, agents, keel, starter, workers, workflows)},
            "prompt": str(oncall.prompt_path()), "versions": oncall.prompt_versions(),
            "sys_path": sys.path, "repo_tests_importable": importlib.util.find_spec("tests") is not None,
            "result": result.model_dump(mode="json"),
            "commands": sorted(c.name or "" for c in app.registered_commands),
        }
        print("REPORT " + json.dumps(report), flush=True)

    asyncio.run(main())
    os._exit(0)  # as starter.cli.main: skip a teardown that the Temporal client's threads can abort
''')


def copy_sources(dest: Path) -> list[str]:
    """The project as a source tree to build from (the build writes build/ and *.egg-info beside its
    sources: never into the shared checkout). Returns the top-level packages pyproject.toml declares."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = config["tool"]["setuptools"]["packages"]
    top = sorted({p.split(".")[0] for p in packages})
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, dest / name)
    for pkg in top:
        shutil.copytree(ROOT / pkg, dest / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*"))
    return top


def install(src: Path, target: Path) -> None:
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail(f"setuptools is not installed in {sys.prefix}: the install test builds with it, offline "
                    "(add setuptools to the dev extras)")
    cmd = [sys.executable, "-c", "from setuptools import setup; setup()", "--quiet", "install",
           "--single-version-externally-managed", "--record", str(target.parent / "installed-files.txt"),
           "--install-lib", str(target), "--install-scripts", str(target / "bin"),
           "--install-data", str(target / "data"), "--install-headers", str(target / "include")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"install failed:\n{done.stdout}\n{done.stderr}"


def test_a_non_editable_install_runs_the_oncall_agent(tmp_path: Path) -> None:
    started = time.monotonic()
    target = tmp_path / "site"
    top = copy_sources(tmp_path / "src")
    install(tmp_path / "src", target)
    installed_in = time.monotonic() - started

    # What a wheel holds: the packages, the prompts as package data, the metadata, the console script.
    for pkg in top:
        assert (target / pkg / "__init__.py").is_file(), pkg
    prompts = target / "agents" / "oncall" / "prompts"
    assert (prompts / "oncall.v1.md").is_file() and (prompts / "oncall.v2.md").is_file()
    assert list(target.glob("keel-*.egg-info")) and (target / "bin" / "keel").is_file()
    assert not (target / "tests").exists()

    # The installed copy only: outside the checkout, no site processing (so the editable install's
    # finder in .venv is not loaded), the install directory, then .venv's site-packages for the
    # dependencies and the `temporal` binary beside this interpreter.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "check_install.py").write_text(SCRIPT)
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KEEL_", "ONCALL_"))}
    env |= {"PYTHONPATH": os.pathsep.join([str(target), site]), "KEEL_TRACING": "false",
            "KEEL_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-S", "check_install.py"], cwd=run_dir, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    report_lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and report_lines, f"the installed copy failed:\n{done.stdout}\n{done.stderr}"
    report: dict[str, Any] = json.loads(report_lines[-1].removeprefix("REPORT "))

    for name, file in report["modules"].items():
        assert Path(file).is_relative_to(target), f"{name} was imported from {file}, not the install"
    assert Path(report["prompt"]) == prompts / "oncall.v1.md"
    assert report["versions"] == ["v1", "v2"]
    assert (target / "agents" / "dr_plan" / "prompts" / "dr_planner.v1.md").is_file() and "plan" in report["commands"]
    assert not report["repo_tests_importable"]
    assert all(Path(p or ".").resolve() != ROOT for p in report["sys_path"])

    result = report["result"]
    assert result["status"] == "completed", result["reason"]
    assert result["tools_executed"] == ["service_status"]
    assert "api is healthy" in result["output"] and "2.14.1" in result["output"]
    assert time.monotonic() - started < 60, f"took {time.monotonic() - started:.1f} s (install {installed_in:.1f} s)"
