"""Encrypted history for generic agent tasks: the support desk answers a request that carries a card
number and an e-mail address, through a client and worker with Keel's encryption codec. What Temporal
stores holds none of it, nor the account data the tools returned or the model's answer; the decrypted
payloads do (not vacuous); the result reads with the codec and not without it; `temporal workflow show`
reads it through `keel codec-server` only."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

import keel
from agents.support_desk import support_desk
from agents.support_desk.data import build_seed
from keel.codec import EncryptionCodec, data_converter
from keel.settings import KeelSettings
from keel.testing import agent_environment
from starter.codec_server import CodecServer
from starter.trace_cli import NO_KEYS, task_trace
from tests.test_codec import _payload_data, _payloads, _temporal_show

KEY = base64.b64encode(bytes(range(32))).decode()
SEED = build_seed()
CUSTOMER = next(c for c in SEED["customers"] if c["id"] == "C-1001")
IBANS = [a["iban"] for a in SEED["accounts"] if a["customer_id"] == "C-1001" and a.get("iban")]


async def test_an_agent_history_holds_no_plaintext(dev_env: WorkflowEnvironment, db_url: str) -> None:
    conv = data_converter(KeelSettings(encrypt=True, encryption_keys=f"k1:{KEY}"))
    codec = conv.payload_codec
    assert isinstance(codec, EncryptionCodec)
    plain = dev_env.client
    enc = await Client.connect(plain.service_client.config.target_host, namespace=plain.namespace,
                               data_converter=conv)
    text = (f"Customer: C-1001\n\nWhy was I charged a fee of 4.90 EUR on my card {CUSTOMER['card_number']}? "
            f"Please answer to {CUSTOMER['email']}.")
    async with agent_environment(support_desk, client=enc, db_url=db_url) as env:
        res = await env.run("support_desk", text, tenant="C-1001")
    assert res.status == "completed" and "get_account" in res.tools_executed, res
    answer = json.dumps(res.output)[1:41]
    secrets = [text, CUSTOMER["email"], CUSTOMER["card_number"], CUSTOMER["phone"], CUSTOMER["name"], answer,
               *IBANS]

    history = await plain.get_workflow_handle(res.workflow_id).fetch_history()
    raw = b"".join(e.SerializeToString() for e in history.events)
    for s in secrets:
        assert s.encode() not in raw and json.dumps(s)[1:-1].encode() not in raw, f"{s!r} in plaintext"

    def exempt(event: Any, path: str) -> bool:  # search attributes and the SDK core's own markers
        marker = event.marker_recorded_event_attributes.marker_name
        return "search_attributes" in path or marker in ("core_patch", "core_local_activity")

    encrypted = [p for e in history.events for path, p in _payloads(e) if not exempt(e, path)]
    assert len(encrypted) > 10
    assert all(p.metadata.get("encoding") == b"binary/encrypted" for p in encrypted)
    decoded = b"".join(p.data for p in await codec.decode(encrypted))
    for s in [CUSTOMER["email"], CUSTOMER["card_number"], CUSTOMER["name"], answer]:
        assert s.encode() in decoded, s

    # `keel trace --content` reads what the model said with the keys; without them it says where they come from.
    with_keys = await task_trace(enc, res.workflow_id, content=True)
    said = [n.content for n in with_keys.nodes if n.kind == "llm" and n.content is not None]
    assert said and not any(c.unreadable for c in said)
    closing = said[-1].text.strip().splitlines()[-1]  # the answer's last line, as the model wrote it
    assert closing and closing in res.output
    without = await task_trace(plain, res.workflow_id, content=True)
    locked = [n.content for n in without.nodes if n.kind == "llm"]
    assert locked and all(c is not None and c.unreadable == NO_KEYS for c in locked)
    assert "KEEL_ENCRYPT=1" in NO_KEYS and "KEEL_ENCRYPTION_KEYS" in NO_KEYS
    assert not any(closing in (c.text if c else "") for c in locked)

    again = await enc.get_workflow_handle(res.workflow_id, result_type=keel.AgentResult).result()
    assert again == res
    with pytest.raises(Exception, match="binary/encrypted"):
        await plain.get_workflow_handle(res.workflow_id, result_type=keel.AgentResult).result()

    # The temporal CLI reads it through `keel codec-server`, and only through it.
    with CodecServer(codec, port=0) as server:
        shown = _payload_data(await _temporal_show(plain, res.workflow_id, server.url))
    assert CUSTOMER["email"].encode() in shown and CUSTOMER["card_number"].encode() in shown
    assert CUSTOMER["email"].encode() not in _payload_data(await _temporal_show(plain, res.workflow_id, None))
