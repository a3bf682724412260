"""Real local HTTP servers that receive alerts: a recorder, and one that never answers."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Recorder:
    """Records every JSON body POSTed to it; `delay` makes it answer slowly, `hang` never, and
    `status` is the answer's code (500: a sink that fails every delivery)."""

    def __init__(self, delay: float = 0.0, hang: bool = False, status: int = 200) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.delay, self.hang, self.status = delay, hang, status
        self._stop = threading.Event()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                recorder.raw.append(body)
                try:
                    recorder.bodies.append(json.loads(body))
                except ValueError:
                    recorder.bodies.append({"_raw": body.decode("utf-8", "replace")})
                if recorder.hang:
                    recorder._stop.wait(120)
                    return
                if recorder.delay:
                    time.sleep(recorder.delay)
                self.send_response(recorder.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook/s3cr3t-token"

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [b for b in list(self.bodies) if name is None or b.get("event") == name]

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
