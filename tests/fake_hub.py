"""A model hub on loopback for the download tests: the few routes huggingface_hub asks for
(repository info, file metadata, file bytes with ranges), serving repositories the test builds.
It can cut a connection part-way through a file, once, to prove downloads resume."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]]  # repository -> {path: bytes}
    cut_once: set[str] = field(default_factory=set)  # paths whose first download stops half-way
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.serve(self, body=False)

            def do_GET(self) -> None:
                hub.serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append((handler.command, path, handler.headers.get("Range")))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if info:
            repo = info.group(1)
            if repo not in self.repos:
                return self.reply(handler, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            data = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(self.repos[repo])]}  # fmt: skip
            return self.reply(handler, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not resolve or resolve.group(3) not in self.repos.get(resolve.group(1), {}):
            return self.reply(handler, 404, b"not found", {"X-Error-Code": "EntryNotFound"}, body)
        name = resolve.group(3)
        content = self.repos[resolve.group(1)][name]
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(content).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start = 0
        wanted = handler.headers.get("Range")
        if wanted and (match := re.fullmatch(r"bytes=(\d+)-", wanted)):
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        if body and name in self.cut_once and start == 0:
            self.cut_once.discard(name)
            handler.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(content))}.items():
                handler.send_header(key, value)
            handler.end_headers()
            for start in range(0, len(content) // 2, 65536):  # in pieces, as a network delivers them
                handler.wfile.write(content[start : min(start + 65536, len(content) // 2)])
                handler.wfile.flush()
            handler.close_connection = True
            return None
        return self.reply(handler, 206 if start else 200, content[start:], headers, body)

    @staticmethod
    def reply(
        handler: BaseHTTPRequestHandler, status: int, content: bytes, headers: dict[str, str], body: bool = True
    ) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(content)
