"""A small service-status HTTP API for the on-call agent's demo and tests (loopback only).

GET /services/<name> -> {"service", "status", "version", "error_rate"}; 404 for an unknown one.
POST /services/<name>/restart with an Idempotency-Key header -> {"restart_id", "status": "restarted"};
the same key again returns the same restart: the restart happens once.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_SERVICES = {
    "api": {"status": "healthy", "version": "2.14.1", "error_rate": 0.002},
    "payments": {"status": "down", "version": "5.2.0", "error_rate": 0.61},
    "search": {"status": "degraded", "version": "1.9.3", "error_rate": 0.08},
}


class StatusService:
    def __init__(self, services: dict[str, dict[str, Any]] | None = None, port: int = 0) -> None:
        self.services = {k: dict(v) for k, v in (services or DEFAULT_SERVICES).items()}
        self.restarts: dict[str, dict[str, Any]] = {}
        """Idempotency key -> the restart it made."""
        self.fail_next = 0
        """Answer this many requests with a 503 first (a flaky dependency)."""
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StatusService:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _flaky(self) -> bool:
                with svc._lock:
                    if svc.fail_next > 0:
                        svc.fail_next -= 1
                        self._send(503, {"error": "unavailable"})
                        return True
                return False

            def do_GET(self) -> None:
                if self._flaky():
                    return
                parts = self.path.strip("/").split("/")
                if len(parts) == 2 and parts[0] == "services" and parts[1] in svc.services:
                    self._send(200, {"service": parts[1], **svc.services[parts[1]]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self._flaky():
                    return
                parts = self.path.strip("/").split("/")
                key = self.headers.get("Idempotency-Key", "")
                if len(parts) != 3 or parts[0] != "services" or parts[2] != "restart" or parts[1] not in svc.services:
                    self._send(404, {"error": "not found"})
                    return
                if not key:
                    self._send(400, {"error": "Idempotency-Key header required"})
                    return
                with svc._lock:
                    done = svc.restarts.get(key)
                    if done is None:
                        done = {"restart_id": f"RS-{len(svc.restarts) + 1}", "service": parts[1], "status": "restarted"}
                        svc.restarts[key] = done
                        svc.services[parts[1]]["status"] = "healthy"
                self._send(200, done)

        return Handler


def main() -> None:
    """`python -m agents.oncall.status_service [PORT]`: serve the demo services until interrupted."""
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8710
    with StatusService(port=port) as s:
        print(f"service status API on {s.url}", flush=True)
        s.thread.join()


if __name__ == "__main__":
    main()
