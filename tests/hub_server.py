"""A loopback stand-in for the few Hugging Face Hub endpoints huggingface_hub's downloads use, serving one repo
from memory: model info (with file sizes), the recursive tree listing, and HEAD/GET (with Range) on
`resolve/<revision>/<file>` with the ETag, X-Repo-Commit and Content-Length headers the client relies on.

Bound to 127.0.0.1 only, started and stopped by the test, and it refuses requests past a fixed budget."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

REQUEST_BUDGET = 400
CUT_BEFORE_END = 4096
PACED_PIECE = 1024 * 1024
PACED_PAUSE_S = 0.1


class HubRepo:
    """One repo's files (path -> bytes) at one commit, plus what the server saw and how it misbehaves."""

    def __init__(self, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
        self.repo_id, self.commit, self.files = repo_id, commit, files
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path in repo or api path, Range header)
        self.cut_once: set[str] = set()     # first GET of these stops short (connection dropped)
        self.failing: set[str] = set()      # GETs of these answer 500
        self.paced: set[str] = set()        # GETs of these send 1 MB every 0.1 s (a slow line, for a cancel midway)
        self.lock = threading.Lock()

    @classmethod
    def from_folder(cls, repo_id: str, commit: str, folder: Path, extra: dict[str, bytes]) -> "HubRepo":
        files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
                 if path.is_file()}
        return cls(repo_id, commit, {**files, **extra})

    def fetched(self) -> set[str]:
        return {path for method, path, _ in self.requests if method == "GET" and path in self.files}


def _sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(repo: HubRepo):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _json(self, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _not_found(self) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _route(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            with repo.lock:
                if len(repo.requests) >= REQUEST_BUDGET:
                    self.send_error(429)
                    return
            api = f"/api/models/{repo.repo_id}"
            resolve = f"/{repo.repo_id}/resolve/"
            if path == api or path.startswith(api + "/"):
                with repo.lock:
                    repo.requests.append((method, path, None))
                kind, _, rest = (path[len(api) + 1:] or "revision/main").partition("/")
                revision = rest.split("/")[0]
                if revision not in ("main", repo.commit):
                    return self._not_found()
                if kind == "revision":
                    return self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                                       "private": False, "siblings": [
                                           {"rfilename": name, "size": len(data), "blobId": _sha1(data)}
                                           for name, data in repo.files.items()]})
                if kind == "tree":
                    return self._json([{"type": "file", "path": name, "size": len(data), "oid": _sha1(data)}
                                       for name, data in repo.files.items()])
                return self._not_found()
            if not path.startswith(resolve):
                return self._not_found()
            revision, _, name = path[len(resolve):].partition("/")
            with repo.lock:
                repo.requests.append((method, name, self.headers.get("Range")))
            if revision not in ("main", repo.commit) or name not in repo.files:
                return self._not_found()
            data = repo.files[name]
            if method == "GET" and name in repo.failing:
                self.send_error(500)
                return
            start = 0
            if method == "GET" and self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if method == "HEAD":
                return
            body = data[start:]
            with repo.lock:
                cut = name in repo.cut_once
                repo.cut_once.discard(name)
            if cut:  # drop the connection just before the end, as a flaky network would
                self.wfile.write(body[: len(body) - CUT_BEFORE_END])
                self.wfile.flush()
                self.close_connection = True
                return
            if name in repo.paced:
                try:
                    for start in range(0, len(body), PACED_PIECE):
                        self.wfile.write(body[start:start + PACED_PIECE])
                        self.wfile.flush()
                        time.sleep(PACED_PAUSE_S)
                except ConnectionError:  # the client stopped reading (a cancel)
                    self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

    return Handler


class HubServer:
    """`with HubServer(repo) as url:` serves `repo` on 127.0.0.1 until the block ends."""

    def __init__(self, repo: HubRepo) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(repo))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
