"""A local stand-in for the Hub's download endpoints, so `snapshot_download` runs for real in tests (HF_ENDPOINT).

Serves the files of one folder as repo `repo_id` at one commit: repo info, the recursive tree listing, and
`resolve` (HEAD and GET). Every write (POST) is refused with `write_status`, as the Hub refuses a missing or invalid
token (401) or one without write access (403). Run `python -m tests.hub_server FOLDER REPO_ID` to try it by hand.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    """`with HubServer(folder, "org/name") as url:` serves `folder` as that repo at `url` on 127.0.0.1."""

    def __init__(self, folder: Path, repo_id: str, write_status: int = 401) -> None:
        self.files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        self.repo_id = repo_id
        self.write_status = write_status
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_POST(self) -> None:
                server.requests.append(f"POST {unquote(urlparse(self.path).path)}")
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.dumps({"error": "Invalid username or password."}).encode()
                self.send_response(server.write_status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                server.requests.append(f"{self.command} {path}")
                repo = f"/api/models/{server.repo_id}"
                if path.startswith(f"{repo}/revision/"):
                    info = {"id": server.repo_id, "sha": COMMIT, "siblings": [{"rfilename": n} for n in server.files]}
                    return self._send(json.dumps(info).encode(), "application/json", body)
                if path.startswith(f"{repo}/tree/"):
                    tree = [
                        {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in server.files.items()
                    ]
                    return self._send(json.dumps(tree).encode(), "application/json", body)
                prefix = f"/{server.repo_id}/resolve/"
                if path.startswith(prefix):
                    name = path[len(prefix) :].split("/", 1)[-1]
                    if name in server.files:
                        data = server.files[name]
                        return self._send(data, "application/octet-stream", body, etag=hashlib.sha1(data).hexdigest())
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound" if server.repo_id not in path else "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, data: bytes, content_type: str, body: bool, etag: str | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                if etag:
                    self.send_header("ETag", f'"{etag}"')
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def closed_port_url() -> str:
    """`http://127.0.0.1:PORT` where nothing listens (a port the OS just handed out and took back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"
