"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for the endpoint judge's tests and benchmark.

`respond(body)` decides each answer to POST /v1/chat/completions: a completion's text, or an HTTP status with
headers, or a raw body; `delay` seconds pass before each answer. GET /v1/models answers a model list. Every
request is recorded (path, headers, JSON body), and the most requests in flight at once is kept.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that timed out and left: not the test's failure
        pass


@dataclass
class Reply:
    content: str | None = "safe"
    status: int = 200
    headers: dict = field(default_factory=dict)
    raw: bytes | None = None  # sent as the body instead of a completion
    delay: float = 0.0  # on top of the server's delay


def completion(content: str | None, model: str = "judge") -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class JudgeServer:
    def __init__(self, respond: Callable[[dict], Reply] = lambda body: Reply(), delay: float = 0.0):
        self.respond, self.delay = respond, delay
        self.requests: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def completions(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/v1/chat/completions"]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # small writes sent at once: no 40 ms Nagle and delayed-ACK stall

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": None})
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "judge"}]}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
                with server._lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    reply = server.respond(body)
                    time.sleep(server.delay + reply.delay)
                    if reply.raw is not None:
                        payload = reply.raw
                    elif reply.status == 200:
                        payload = json.dumps(completion(reply.content, body.get("model", "judge"))).encode()
                    else:
                        payload = json.dumps({"error": {"message": f"status {reply.status}"}}).encode()
                    self._send(reply.status, payload, reply.headers)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler

    def __enter__(self) -> JudgeServer:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
