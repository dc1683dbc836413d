"""A local HTTP server for the fetch tests: GitHub-raw-style paths, Range requests, 404s, a download cut off
half-way, and the Hugging Face hub's resolve endpoint (HEAD metadata + GET) for huggingface_hub."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Files:
    def __init__(self):
        self.files: dict[str, bytes] = {}   # url path -> bytes
        self.cut: set[str] = set()          # paths whose next GET is cut off half-way
        self.gets: list[str] = []           # every GET served (to count downloads)
        self.ranges: list[str] = []


def serve(files: Files):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _head(self, body, status=200, extra=None):
            self.send_response(status)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def _find(self):
            path = self.path.split("?")[0]
            return path, files.files.get(path)

        def do_HEAD(self):
            path, body = self._find()
            if body is None:
                self._head(b"", 404)
                return
            sha = hashlib.sha256(body).hexdigest()
            self._head(body, 200, {"ETag": f'"{sha}"', "X-Repo-Commit": "c" * 40, "X-Linked-Etag": f'"{sha}"',
                                   "X-Linked-Size": str(len(body)), "Accept-Ranges": "bytes"})

        def do_GET(self):
            path, body = self._find()
            if body is None:
                self._head(b"", 404)
                self.close_connection = True
                return
            files.gets.append(path)
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng:
                files.ranges.append(rng)
                start, status = int(rng.split("=")[1].split("-")[0]), 206
                if start >= len(body):
                    self._head(b"", 416)
                    return
            part = body[start:]
            extra = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if status == 206 else {}
            sha = hashlib.sha256(body).hexdigest()
            extra.update({"ETag": f'"{sha}"', "X-Repo-Commit": "c" * 40})
            self._head(part, status, extra)
            if path in files.cut:  # send half, then drop the connection
                files.cut.discard(path)
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(part)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"
