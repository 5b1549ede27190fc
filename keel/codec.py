"""Encrypted Temporal history: an AES-256-GCM `PayloadCodec`, its keys from the settings, and the data converter.

With `KEEL_ENCRYPT=1` every payload the client or worker sends to Temporal (workflow and activity inputs and
results, signals, queries, updates, failure messages) is ciphertext in Temporal's history; only holders of
the keys (workers, the `keel` CLI, `keel codec-server` for the UI) can read it. Search attributes are not
payloads and stay plaintext: Keel's hold the tenant, task type, feature and status, never an input.

Wire format (that of Temporal's samples, so their codec servers can read it too): the encoded payload has
metadata `encoding: binary/encrypted` and `encryption-key-id: <id>`, and data = 12-byte random nonce +
AES-GCM(key, nonce) of the serialized original Payload proto (its metadata included).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    EncodingPayloadConverter,
    PayloadCodec,
)

from keel.settings import KeelSettings

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
KEY_BYTES = 32
_TAG_BYTES = 16

ENV_ENCRYPT = "KEEL_ENCRYPT"
ENV_KEYS = "KEEL_ENCRYPTION_KEYS"
ENV_KEY_ID = "KEEL_ENCRYPTION_KEY_ID"
KEYGEN_HINT = (
    "make a key with `keel codec-server --new-key`, or: "
    'python -c "import os,base64;print(base64.b64encode(os.urandom(32)).decode())"'
)


class EncryptionConfigError(ValueError):
    """The encryption settings are missing or malformed; the message names the variable to fix."""


class PayloadDecryptionError(ValueError):
    """An encrypted payload cannot be decrypted: its key id is unknown, or the key or data is wrong."""


def new_key() -> str:
    """A fresh random AES-256 key, base64."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def parse_keys(spec: str) -> dict[str, bytes]:
    """`id1:<base64 key>,id2:<base64 key>` -> {id: key}, in the order given; raises EncryptionConfigError."""
    keys: dict[str, bytes] = {}
    for n, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        key_id, sep, b64 = entry.partition(":")
        key_id, b64 = key_id.strip(), b64.strip()
        if not sep or not key_id or not b64:
            raise EncryptionConfigError(
                f"{ENV_KEYS}: entry {n} is not `id:<base64 key>` (format: id1:<key>,id2:<key>); {KEYGEN_HINT}"
            )
        if any(c.isspace() for c in key_id):
            raise EncryptionConfigError(f"{ENV_KEYS}: key id {key_id!r} contains whitespace")
        if key_id in keys:
            raise EncryptionConfigError(f"{ENV_KEYS}: key id {key_id!r} is listed twice")
        try:
            key = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise EncryptionConfigError(
                f"{ENV_KEYS}: the key of id {key_id!r} is not valid base64 ({e}); {KEYGEN_HINT}"
            ) from e
        if len(key) != KEY_BYTES:
            raise EncryptionConfigError(
                f"{ENV_KEYS}: the key of id {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES} "
                f"(44 base64 characters); {KEYGEN_HINT}"
            )
        keys[key_id] = key
    if not keys:
        raise EncryptionConfigError(f"{ENV_KEYS} lists no key (format: id1:<base64 key>,...); {KEYGEN_HINT}")
    return keys


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole payloads, with key rotation by id: encrypts with the active key, decrypts
    with whichever key the payload names. Payloads that are not `binary/encrypted` decode unchanged, so
    histories written before encryption was turned on still read."""

    def __init__(self, keys: Mapping[str, bytes], active_key_id: str | None = None) -> None:
        if not keys:
            raise EncryptionConfigError(f"no encryption key given; set {ENV_KEYS}; {KEYGEN_HINT}")
        for key_id, key in keys.items():
            if len(key) != KEY_BYTES:
                raise EncryptionConfigError(f"key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")
        active = active_key_id if active_key_id is not None else next(iter(keys))
        if active not in keys:
            raise EncryptionConfigError(
                f"{ENV_KEY_ID}={active!r} is not one of the ids in {ENV_KEYS} ({', '.join(keys)})"
            )
        self.key_id = active
        self.key_ids = tuple(keys)
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._active = self._ciphers[active]
        self._active_id_bytes = active.encode()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.encode_sync(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.decode_sync(payloads)

    def encode_sync(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            nonce = os.urandom(NONCE_BYTES)
            out.append(
                Payload(
                    metadata={"encoding": ENCODING, KEY_ID_METADATA: self._active_id_bytes},
                    data=nonce + self._active.encrypt(nonce, p.SerializeToString(), None),
                )
            )
        return out

    def decode_sync(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                out.append(p)
                continue
            key_id = p.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                raise PayloadDecryptionError(
                    f"payload encrypted with key id {key_id!r}, which is not in {ENV_KEYS} "
                    f"(known ids: {', '.join(self.key_ids)}); add `{key_id}:<its base64 key>` to {ENV_KEYS} "
                    f"(keep retired keys listed while histories encrypted with them are still read)"
                )
            if len(p.data) < NONCE_BYTES + _TAG_BYTES:
                raise PayloadDecryptionError(f"payload encrypted with key id {key_id!r} is truncated")
            try:
                plain = cipher.decrypt(p.data[:NONCE_BYTES], p.data[NONCE_BYTES:], None)
            except InvalidTag as e:
                raise PayloadDecryptionError(
                    f"cannot decrypt a payload with key id {key_id!r}: authentication failed (the key listed "
                    f"for {key_id!r} in {ENV_KEYS} is not the one it was encrypted with, or the data was altered)"
                ) from e
            out.append(Payload.FromString(plain))
        return out


def codec_from_settings(settings: KeelSettings, *, required: bool = False) -> EncryptionCodec | None:
    """The codec the settings ask for: None when encryption is off (unless `required`, as for the codec
    server, which needs the keys whatever KEEL_ENCRYPT says). Raises EncryptionConfigError."""
    if not settings.encrypt and not required:
        return None
    if not (settings.encryption_keys or "").strip():
        why = f"{ENV_ENCRYPT} is on but" if settings.encrypt else "the codec server needs keys, but"
        raise EncryptionConfigError(
            f"{why} {ENV_KEYS} is not set; set {ENV_KEYS}=k1:<base64 of 32 random bytes>; {KEYGEN_HINT}"
        )
    keys = parse_keys(settings.encryption_keys or "")
    active = settings.encryption_key_id.strip() if settings.encryption_key_id else None
    return EncryptionCodec(keys, active or None)


class KeelPayloadConverter(PydanticPayloadConverter):
    """Temporal's pydantic payload converter (the same JSON), with its encoding converters built once
    per process and shared, and so their cache of pydantic TypeAdapters.

    The SDK makes a new payload converter for every workflow activation and every activity task (a
    data converter with a serialization context), and each new PydanticPayloadConverter starts an
    empty TypeAdapter cache: every LlmRequest, LlmResponse or ToolResult decoded in the worker built
    its TypeAdapter again (bench/throughput.py). The shared converters keep no per-call state; the
    cache is thread-safe and bounded (1024 types)."""

    _shared: ClassVar[tuple[EncodingPayloadConverter, ...] | None] = None

    def __init__(self) -> None:
        shared = KeelPayloadConverter._shared
        if shared is None:
            super().__init__()
            KeelPayloadConverter._shared = tuple(self.converters.values())
        else:
            self._set_converters(*shared)


keel_data_converter = DataConverter(payload_converter_class=KeelPayloadConverter)
"""pydantic_data_converter's payloads, cheaper to make per activation (KeelPayloadConverter)."""


def data_converter(settings: KeelSettings) -> DataConverter:
    """Pydantic JSON payloads; with KEEL_ENCRYPT, encrypted, and failure messages and stack traces moved
    into the (encrypted) failure payload, so an error quoting the input does not leak it either."""
    codec = codec_from_settings(settings)
    if codec is None:
        return keel_data_converter
    return dataclasses.replace(
        keel_data_converter,
        payload_codec=codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
