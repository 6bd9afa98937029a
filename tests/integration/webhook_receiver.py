"""A webhook receiver for the tests: a real HTTP server on loopback that checks each delivery's
signature with the `standardwebhooks` library, as a client's receiver would, and can misbehave
(redirect, answer slowly, stream a huge body, be down)."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

HUGE_BODY_BYTES = 1 << 30


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    # Which of the receiver's secrets verify this delivery's signature.
    verified_by: list[str]

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    secrets: list[str] = field(default_factory=list)
    # ok | redirect | slow | huge | hold
    mode: str = "ok"
    slow_seconds: float = 6.0
    port: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    # Bytes of the huge body written before the client hung up.
    huge_bytes_sent: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/parley"

    def reserve_port(self) -> None:
        """Pick a free port and leave it closed: the receiver is down until start()."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified = []
                for secret in receiver.secrets:
                    try:
                        Webhook(secret).verify(body, headers)
                        verified.append(secret)
                    except WebhookVerificationError:
                        pass
                receiver.deliveries.append(Delivery(self.path, headers, body, verified))
                receiver.respond(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def respond(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path != "/hooks/parley" or self.mode == "ok":
            handler.send_response(200 if handler.path == "/hooks/parley" else 204)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif self.mode == "redirect":
            handler.send_response(307)
            handler.send_header("Location", f"http://127.0.0.1:{self.port}/landed")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif self.mode in ("slow", "hold"):
            if self.mode == "slow":
                time.sleep(self.slow_seconds)
            else:
                self.released.wait(60)
            handler.send_response(200)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif self.mode == "huge":
            handler.send_response(200)
            handler.send_header("Content-Length", str(HUGE_BODY_BYTES))
            handler.end_headers()
            chunk = b"x" * 65536
            try:
                while self.huge_bytes_sent < HUGE_BODY_BYTES:
                    handler.wfile.write(chunk)
                    self.huge_bytes_sent += len(chunk)
            except OSError:
                pass  # the client hung up: what we want

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def to(self, path: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.path == path]
