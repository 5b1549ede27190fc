"""A codec server for the Temporal UI and CLI ("remote codec endpoint"): POST /encode and /decode.

Protocol (Temporal's): the body is a `Payloads` message in protobuf JSON, `{"payloads": [...]}`, and so is
the answer. The UI calls `<endpoint>/decode` (and `/encode`) from the browser with headers
content-type, x-namespace and, if "Pass the user access token" is on, authorization: hence the CORS
preflight (OPTIONS) for the UI's origin. Paths ending in /encode or /decode are accepted under any prefix
(e.g. `/default/decode`). Standard library only (ThreadingHTTPServer); bound to 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from keel.codec import EncryptionCodec

log = logging.getLogger("keel.codec_server")

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Temporal caps a payload at a few MB; a history page of them stays well under this."""
ALLOW_HEADERS = "content-type,x-namespace,authorization"


def default_origins(ui_url: str) -> list[str]:
    """The UI's origin, and its twin when it is a loopback address (a browser may use either name)."""
    origin = ui_url.rstrip("/")
    parts = urlsplit(origin)
    out = [origin]
    twins = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}
    if parts.hostname in twins:
        port = f":{parts.port}" if parts.port else ""
        out.append(f"{parts.scheme}://{twins[parts.hostname]}{port}")
    return out


class CodecServer:
    """`with CodecServer(...) as s:` serves in a background thread; `serve_forever()` in the caller's."""

    def __init__(
        self,
        codec: PayloadCodec,
        *,
        host: str = "127.0.0.1",
        port: int = 8081,
        allowed_origins: Iterable[str] = (),
        auth_token: str | None = None,
    ) -> None:
        self.codec = codec
        self.allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins)
        self.auth_token = auth_token or None
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> CodecServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="keel-codec-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> CodecServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authorized(self, header: str | None) -> bool:
        if self.auth_token is None:
            return True
        expected = f"Bearer {self.auth_token}".encode()
        return header is not None and hmac.compare_digest(header.strip().encode(), expected)

    def apply(self, op: str, body: bytes) -> bytes:
        payloads = json_format.Parse(body, Payloads())
        if isinstance(self.codec, EncryptionCodec):  # pure CPU: no event loop needed
            sync = self.codec.encode_sync if op == "encode" else self.codec.decode_sync
            out = Payloads(payloads=sync(payloads.payloads))
        else:
            fn = self.codec.encode if op == "encode" else self.codec.decode
            out = Payloads(payloads=asyncio.run(fn(payloads.payloads)))
        return json_format.MessageToJson(out).encode()


def _handler_for(server: CodecServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "keel-codec"

        def _cors(self) -> None:
            origin = self.headers.get("Origin")
            if origin and origin.rstrip("/") in server.allowed_origins:
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
                self.send_header("Access-Control-Allow-Headers", ALLOW_HEADERS)
                self.send_header("Access-Control-Allow-Credentials", "true")
                self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Vary", "Origin")

        def _reply(self, status: HTTPStatus, body: bytes = b"", extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self._cors()
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            if body:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _error(self, status: HTTPStatus, message: str, extra: dict[str, str] | None = None) -> None:
            self._reply(status, json.dumps({"error": message}).encode(), extra)

        def _op(self) -> str | None:
            last = urlsplit(self.path).path.rstrip("/").rsplit("/", 1)[-1]
            return last if last in ("encode", "decode") else None

        def _foreign_origin(self) -> bool:
            # Non-browser clients send no Origin; a browser page from another site is refused outright.
            origin = self.headers.get("Origin")
            return origin is not None and origin.rstrip("/") not in server.allowed_origins

        def do_OPTIONS(self) -> None:
            # A preflight carries no credentials: it is answered without the token check.
            if self._op() is None:
                self._error(HTTPStatus.NOT_FOUND, "use /encode or /decode")
            elif self._foreign_origin():
                self._error(HTTPStatus.FORBIDDEN, "origin not allowed")
            else:
                self._reply(HTTPStatus.NO_CONTENT)

        def do_POST(self) -> None:
            op = self._op()
            length = int(self.headers.get("Content-Length") or 0)
            if op is None:
                self._drain(length)
                return self._error(HTTPStatus.NOT_FOUND, "use POST /encode or /decode")
            if self._foreign_origin():
                self._drain(length)
                return self._error(HTTPStatus.FORBIDDEN, "origin not allowed")
            if not server.authorized(self.headers.get("Authorization")):
                self._drain(length)
                return self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token",
                                   {"WWW-Authenticate": 'Bearer realm="keel-codec"'})
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
            body = self.rfile.read(length)
            try:
                out = server.apply(op, body)
            except json_format.ParseError as e:
                return self._error(HTTPStatus.BAD_REQUEST, f"body is not Payloads JSON: {e}")
            except ValueError as e:  # a payload that cannot be decrypted: the message names the key id
                return self._error(HTTPStatus.BAD_REQUEST, str(e))
            self._reply(HTTPStatus.OK, out)

        def do_GET(self) -> None:
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST /encode or /decode", {"Allow": "POST, OPTIONS"})

        def _drain(self, length: int) -> None:
            if 0 < length <= MAX_BODY_BYTES:
                self.rfile.read(length)
            elif length:
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            # The request line and status only: never a payload.
            log.info("%s %s", self.address_string(), format % args)

    return Handler
