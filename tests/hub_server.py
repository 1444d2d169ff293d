"""A fake Hugging Face Hub on 127.0.0.1 for upload tests: the standard library's HTTP server answering the
routes huggingface_hub 2.4 calls to create a repository, a branch, and commit a folder of regular files.

Routes: ``POST /api/repos/create``, ``POST /api/{type}s/{id}/branch/{rev}``, ``POST /api/{type}s/{id}/preupload/{rev}``
(every file "regular", with the git hash of the stored file so unchanged files are skipped),
``POST /api/{type}s/{id}/commit/{rev}`` (NDJSON, base64 contents), ``GET /api/{type}s/{id}/revision/{rev}``,
``POST /api/validate-yaml``, ``GET /api/whoami-v2`` and ``GET /api/agent-harnesses`` (the client's best-effort
agent detection asks for it). Anything else is a 404 recorded in ``unknown``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest


def git_blob_hash(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class FakeRepo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[tuple[str, str, str]] = field(default_factory=list)  # (branch, sha, summary)

    def head(self, branch: str) -> str:
        shas = [sha for name, sha, _ in self.commits if name == branch]
        return shas[-1] if shas else "0" * 40


@dataclass
class FakeHub:
    url: str = ""
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    authorizations: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


_REPO_ROUTE = re.compile(r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/(?P<action>\w[\w-]*)/(?P<rev>.+)")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            hub.authorizations.append(self.headers.get("Authorization", ""))
            path = urlsplit(self.path).path
            if path == "/api/whoami-v2":
                return self._reply(
                    200, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}}
                )
            if path == "/api/agent-harnesses":
                return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
            route = _REPO_ROUTE.fullmatch(path)
            if route and route["action"] == "revision" and route["repo"] in hub.repos:
                repo, revision = hub.repos[route["repo"]], unquote(route["rev"])
                files = repo.branches.get(revision, {})
                return self._reply(
                    200,
                    {
                        "id": route["repo"],
                        "sha": repo.head(revision),
                        "private": repo.private,
                        "siblings": [{"rfilename": name} for name in sorted(files)],
                    },
                )
            hub.unknown.append(f"GET {path}")
            return self._reply(404, {"error": f"unknown route GET {path}"})

        def do_POST(self) -> None:
            hub.authorizations.append(self.headers.get("Authorization", ""))
            path, body = urlsplit(self.path).path, self._body()
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request['organization']}/{request['name']}"
                url = f"{hub.url}/{repo_id}"
                if repo_id in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = FakeRepo(private=request.get("visibility") == "private")
                return self._reply(200, {"url": url, "name": repo_id})
            route = _REPO_ROUTE.fullmatch(path)
            if route is None or route["repo"] not in hub.repos:
                hub.unknown.append(f"POST {path}")
                return self._reply(404, {"error": f"unknown route or repository: POST {path}"})
            repo, revision = hub.repos[route["repo"]], unquote(route["rev"])
            if route["action"] == "branch":
                if revision in repo.branches:
                    return self._reply(409, {"error": "branch already exists"})
                repo.branches[revision] = dict(repo.branches["main"])
                repo.commits.append((revision, repo.head("main"), "branch created"))
                return self._reply(200, {})
            if route["action"] == "preupload":
                stored = repo.branches.get(revision, {})
                files = [
                    {
                        "path": entry["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_hash(stored[entry["path"]]) if entry["path"] in stored else None,
                    }
                    for entry in json.loads(body)["files"]
                ]
                return self._reply(200, {"files": files})
            if route["action"] == "commit":
                files, summary = repo.branches.setdefault(revision, {}), ""
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"]["summary"]
                    elif item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                sha = hashlib.sha1(f"{route['repo']}{revision}{len(repo.commits)}".encode()).hexdigest()
                repo.commits.append((revision, sha, summary))
                return self._reply(
                    200, {"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{route['repo']}/commit/{sha}"}
                )
            hub.unknown.append(f"POST {path}")
            return self._reply(404, {"error": f"unknown route POST {path}"})

    return Handler


@pytest.fixture
def hub_server():
    """A running ``FakeHub`` (``.url`` is its endpoint); stopped after the test."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
