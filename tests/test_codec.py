"""Encrypted history: the AES-GCM codec (round trip, nonces, tampering, rotation, unknown keys, pass-through),
its settings, a ticket end to end on the dev server whose history holds no plaintext PII, and the codec
server (encode/decode, CORS, bearer token), also as the temporal CLI's `--codec-endpoint`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from keel.codec import (
    EncryptionCodec,
    EncryptionConfigError,
    KeelPayloadConverter,
    PayloadDecryptionError,
    codec_from_settings,
    data_converter,
    keel_data_converter,
    parse_keys,
)
from keel.settings import KeelSettings
from keel.types import AgentInput
from starter.codec_server import CodecServer, default_origins
from tests.conftest import _binary

K1, K2 = os.urandom(32), os.urandom(32)
B1, B2 = base64.b64encode(K1).decode(), base64.b64encode(K2).decode()
EMAIL = "ana.silva@example.com"
UI = "http://localhost:8233"


def _plain(value: Any) -> Payload:
    return pydantic_data_converter.payload_converter.to_payloads([value])[0]


# --- the codec -------------------------------------------------------------------------------------------


async def test_round_trip_encrypts_whole_payload() -> None:
    codec = EncryptionCodec({"k1": K1})
    src = [_plain({"text": "card 4181590830166131"}), _plain("hello"), _plain(None)]
    enc = await codec.encode(src)
    assert len(enc) == len(src)
    for p in enc:
        assert dict(p.metadata) == {"encoding": b"binary/encrypted", "encryption-key-id": b"k1"}
        # the inner metadata (json/plain) is inside the ciphertext too
        assert b"4181590830166131" not in p.data and b"json/plain" not in p.data
    assert await codec.decode(enc) == src


async def test_nonce_differs_per_encode() -> None:
    codec = EncryptionCodec({"k1": K1})
    p = _plain("same")
    a, b = await codec.encode([p, p])
    assert a.data[:12] != b.data[:12] and a.data != b.data
    assert await codec.decode([a, b]) == [p, p]


@pytest.mark.parametrize("where", [0, 12, -1], ids=["nonce", "ciphertext", "tag"])
async def test_tampered_ciphertext_fails(where: int) -> None:
    codec = EncryptionCodec({"k1": K1})
    (enc,) = await codec.encode([_plain({"amount": 10})])
    data = bytearray(enc.data)
    data[where] ^= 0x01
    enc.data = bytes(data)
    with pytest.raises(PayloadDecryptionError, match="authentication failed"):
        await codec.decode([enc])


async def test_truncated_and_wrong_key_fail() -> None:
    (enc,) = await EncryptionCodec({"k1": K1}).encode([_plain("x")])
    with pytest.raises(PayloadDecryptionError, match=r"'k1'.*authentication failed"):
        await EncryptionCodec({"k1": K2}).decode([enc])
    short = Payload(metadata=dict(enc.metadata), data=enc.data[:20])
    with pytest.raises(PayloadDecryptionError, match="truncated"):
        await EncryptionCodec({"k1": K1}).decode([short])


async def test_key_rotation() -> None:
    old = EncryptionCodec({"k1": K1})
    before = await old.encode([_plain("written under k1")])
    settings = KeelSettings(encrypt=True, encryption_keys=f"k1:{B1},k2:{B2}", encryption_key_id="k2")
    new = codec_from_settings(settings)
    assert new is not None and new.key_id == "k2"
    assert await new.decode(before) == [_plain("written under k1")]
    after = await new.encode([_plain("written under k2")])
    assert after[0].metadata["encryption-key-id"] == b"k2"
    assert await new.decode(after) == [_plain("written under k2")]
    # a history mixing both keys reads in one call
    assert await new.decode([*before, *after]) == [_plain("written under k1"), _plain("written under k2")]
    # the old codec does not know k2: a clear error, naming the id and the setting
    with pytest.raises(PayloadDecryptionError, match=r"key id 'k2'.*KEEL_ENCRYPTION_KEYS"):
        await old.decode(after)


async def test_unknown_key_id_names_it_and_the_setting() -> None:
    (enc,) = await EncryptionCodec({"k1": K1}).encode([_plain("x")])
    with pytest.raises(PayloadDecryptionError) as e:
        await EncryptionCodec({"k9": K2}).decode([enc])
    assert "'k1'" in str(e.value) and "KEEL_ENCRYPTION_KEYS" in str(e.value) and "k9" in str(e.value)


async def test_unencrypted_payloads_pass_through() -> None:
    codec = EncryptionCodec({"k1": K1})
    plain = [_plain({"a": 1}), _plain("s"), Payload(metadata={"encoding": b"binary/null"})]
    assert await codec.decode(plain) == plain
    # and the converter reads a value written with encryption off
    conv = data_converter(KeelSettings(encrypt=True, encryption_keys=f"k1:{B1}"))
    assert await conv.decode([_plain({"a": 1})], [dict]) == [{"a": 1}]


# --- settings --------------------------------------------------------------------------------------------


def test_encryption_off_keeps_the_pydantic_converter() -> None:
    assert data_converter(KeelSettings()) is keel_data_converter
    # keys alone do not turn it on
    assert data_converter(KeelSettings(encryption_keys=f"k1:{B1}")) is keel_data_converter
    assert keel_data_converter.payload_codec is None


def test_keel_payloads_are_the_pydantic_converters() -> None:
    """Keel's converter writes what pydantic_data_converter writes and reads what it reads (recorded
    histories, other clients), its per-process shared converters holding no state between calls."""
    value = AgentInput(agent="support_desk", tenant="C-1001", input="My card was declined.", budget=None)
    ours, theirs = keel_data_converter.payload_converter, pydantic_data_converter.payload_converter
    payloads = theirs.to_payloads([value])
    assert ours.to_payloads([value]) == payloads
    assert ours.from_payloads(payloads, [AgentInput]) == [value]
    # Made anew per activation by the SDK: each new one shares the first one's encoding converters.
    fresh, other = KeelPayloadConverter(), KeelPayloadConverter()
    assert list(fresh.converters.values()) == list(other.converters.values())
    assert fresh.from_payloads(payloads, [AgentInput]) == [value]


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ENCRYPT", "1")
    monkeypatch.setenv("KEEL_ENCRYPTION_KEYS", f" k1:{B1} , k2:{B2} ,")
    conv = data_converter(KeelSettings())
    assert isinstance(conv.payload_codec, EncryptionCodec)
    assert conv.payload_codec.key_id == "k1" and conv.payload_codec.key_ids == ("k1", "k2")  # first listed
    assert conv.payload_converter_class is KeelPayloadConverter
    monkeypatch.setenv("KEEL_ENCRYPTION_KEY_ID", "k2")
    codec = data_converter(KeelSettings()).payload_codec
    assert isinstance(codec, EncryptionCodec) and codec.key_id == "k2"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("k1:not base64!", "KEEL_ENCRYPTION_KEYS: the key of id 'k1' is not valid base64"),
        (f"k1:{base64.b64encode(os.urandom(16)).decode()}", "'k1' is 16 bytes; AES-256 needs 32"),
        ("k1", "entry 1 is not `id:<base64 key>`"),
        (f"k1:{B1},:{B2}", "entry 2 is not"),
        (f"k1:{B1},k1:{B2}", "'k1' is listed twice"),
        (" , ", "lists no key"),
    ],
)
def test_bad_keys_are_explained(spec: str, message: str) -> None:
    with pytest.raises(EncryptionConfigError, match=re.escape(message)):
        parse_keys(spec)
    with pytest.raises(EncryptionConfigError):
        data_converter(KeelSettings(encrypt=True, encryption_keys=spec))


def test_encrypt_without_keys_says_how_to_make_one() -> None:
    with pytest.raises(EncryptionConfigError) as e:
        data_converter(KeelSettings(encrypt=True))
    msg = str(e.value)
    assert "KEEL_ENCRYPT is on but KEEL_ENCRYPTION_KEYS is not set" in msg
    assert "keel codec-server --new-key" in msg and "base64.b64encode(os.urandom(32))" in msg


def test_active_key_id_must_be_listed() -> None:
    with pytest.raises(EncryptionConfigError, match="KEEL_ENCRYPTION_KEY_ID='k3' is not one of the ids"):
        data_converter(KeelSettings(encrypt=True, encryption_keys=f"k1:{B1},k2:{B2}", encryption_key_id="k3"))


def test_new_key_cli_prints_a_usable_entry() -> None:
    from typer.testing import CliRunner

    from starter.cli import app

    res = CliRunner().invoke(app, ["codec-server", "--new-key", "--key-id", "2025-06"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("KEEL_ENCRYPTION_KEYS="))
    keys = parse_keys(line.split("=", 1)[1])
    assert list(keys) == ["2025-06"] and len(keys["2025-06"]) == 32


# --- end to end: a ticket with PII, and what Temporal stores --------------------------------------------


def _payloads(msg: Message, path: str = "") -> Iterator[tuple[str, Payload]]:
    """Every Payload inside a proto message, with its field path."""
    if isinstance(msg, Payload):
        yield path, msg
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if isinstance(value, Message):
            items: list[tuple[str, Any]] = [("", value)]
        elif hasattr(value, "items") and callable(value.items):  # a map field
            items = [(f"[{k}]", v) for k, v in value.items()]
        else:
            items = [("", v) for v in value]
        for key, v in items:
            if isinstance(v, Message):
                yield from _payloads(v, f"{path}.{fd.name}{key}")


def _payload_data(history_json: str) -> bytes:
    """The data of every payload in `temporal workflow show --output json` (base64 there), concatenated."""
    out: list[bytes] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("metadata"), dict) and isinstance(node.get("data"), str):
                out.append(base64.b64decode(node["data"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(history_json))
    return b"".join(out)


async def _temporal_show(client: Client, workflow_id: str, codec_endpoint: str | None) -> str:
    args = [_binary("temporal"), "workflow", "show", "-w", workflow_id, "--output", "json",
            "--address", client.service_client.config.target_host, "--namespace", client.namespace]
    if codec_endpoint:
        args += ["--codec-endpoint", codec_endpoint]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, errs = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, errs.decode()
    return out.decode()


# --- the codec server ------------------------------------------------------------------------------------


def _call(url: str, method: str = "POST", body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _json(payloads: list[Payload]) -> bytes:
    return json_format.MessageToJson(Payloads(payloads=payloads)).encode()


def test_codec_server_encode_then_decode() -> None:
    src = [_plain({"text": f"mail {EMAIL}"}), _plain("two")]
    with CodecServer(EncryptionCodec({"k1": K1}), port=0, allowed_origins=[UI]) as server:
        status, headers, body = _call(f"{server.url}/encode", body=_json(src), headers={"Origin": UI})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == UI
        enc = json_format.Parse(body, Payloads()).payloads
        assert [p.metadata["encoding"] for p in enc] == [b"binary/encrypted"] * 2
        assert EMAIL.encode() not in body
        assert "payloads" in json.loads(body)
        # the UI posts to <endpoint>/decode; the CLI may put the namespace in the path
        for path in ("/decode", "/default/decode"):
            status, _, body = _call(f"{server.url}{path}", body=_json(list(enc)),
                                    headers={"X-Namespace": "default"})
            assert status == 200
            assert list(json_format.Parse(body, Payloads()).payloads) == src
        # a payload under an unknown key: 400 naming the key id
        (other,) = EncryptionCodec({"k7": K2}).encode_sync([_plain("x")])
        status, _, body = _call(f"{server.url}/decode", body=_json([other]))
        assert status == 400 and "'k7'" in json.loads(body)["error"]
        assert _call(f"{server.url}/decode", body=b"{not json")[0] == 400
        assert _call(f"{server.url}/other", body=b"{}")[0] == 404


def test_codec_server_cors() -> None:
    with CodecServer(EncryptionCodec({"k1": K1}), port=0, allowed_origins=default_origins(UI)) as server:
        for origin in (UI, "http://127.0.0.1:8233"):
            status, headers, _ = _call(f"{server.url}/decode", "OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace,authorization"})
            assert status == 204
            assert headers["Access-Control-Allow-Origin"] == origin
            allowed = {h.strip() for h in headers["Access-Control-Allow-Headers"].split(",")}
            assert {"content-type", "x-namespace", "authorization"} <= allowed
            assert "POST" in headers["Access-Control-Allow-Methods"]
        # another site gets no CORS grant, and its requests are refused
        status, headers, _ = _call(f"{server.url}/decode", "OPTIONS", headers={"Origin": "https://evil.example"})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        assert _call(f"{server.url}/decode", body=_json([]), headers={"Origin": "https://evil.example"})[0] == 403


def test_codec_server_bearer_token() -> None:
    body = _json(EncryptionCodec({"k1": K1}).encode_sync([_plain("secret")]))
    with CodecServer(EncryptionCodec({"k1": K1}), port=0, allowed_origins=[UI], auth_token="s3cret") as server:
        status, headers, _ = _call(f"{server.url}/decode", body=body, headers={"Origin": UI})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert headers["Access-Control-Allow-Origin"] == UI  # so the UI can see the 401
        assert _call(f"{server.url}/decode", body=body, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert _call(f"{server.url}/encode", body=body, headers={"Authorization": "s3cret"})[0] == 401
        # the preflight carries no credentials and is answered
        assert _call(f"{server.url}/decode", "OPTIONS", headers={"Origin": UI})[0] == 204
        status, _, out = _call(f"{server.url}/decode", body=body, headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and list(json_format.Parse(out, Payloads()).payloads) == [_plain("secret")]


def test_default_origins_cover_both_loopback_names() -> None:
    assert default_origins("http://127.0.0.1:8233") == ["http://127.0.0.1:8233", "http://localhost:8233"]
    assert default_origins("https://temporal.example.com/") == ["https://temporal.example.com"]
