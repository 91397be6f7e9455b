"""A real HTTP Hub test server for the huggingface_hub client (the one stand-in pizoo's tests use).

It implements the endpoints huggingface_hub 2.x calls for an upload through the legacy LFS path
(HF_HUB_DISABLE_XET=1) and for snapshot_download, as read from the client's source (hf_api.py,
_commit_api.py, lfs.py, file_download.py, _snapshot_download.py):

- POST /api/repos/create                      409 with `url` when the repo exists
- GET  /api/whoami-v2
- POST /api/validate-yaml                     called by create_commit when README.md is committed
- GET  /api/models/{repo}[/revision/{rev}]    model info with `sha` and `siblings`
- GET  /api/models/{repo}/tree/{rev}          recursive listing (snapshot_download)
- POST /api/models/{repo}/preupload/{rev}     per file: uploadMode regular|lfs, remote oid
- POST /api/models/{repo}/branch/{branch}     409 when it exists
- POST /api/models/{repo}/commit/{rev}        application/x-ndjson: header, file (base64), lfsFile
- POST /{repo}.git/info/lfs/objects/batch     upload actions (none when the object is stored)
- PUT  /__lfs/{oid}                           the upload href (no auth, like a presigned URL)
- POST /__lfs/verify                          the verify href
- HEAD/GET /{repo}/resolve/{rev}/{path}       ETag, X-Repo-Commit, Content-Length, X-Linked-*; Range

Dataset repos answer the same read endpoints under /api/datasets/{repo}/... and
/datasets/{repo}/resolve/...; they are stored under the key `datasets/{repo}` (`dataset_key`), and
`add_branch` gives one a branch of its own files, like the Hub's refs/convert/parquet conversion.

Everything lives in memory. Tokens are configured per server; a wrong token gets 401 on every
endpoint, a read-only token or a foreign namespace gets 403 on writes. `requests` records every
request (method, path) so tests can check, for example, that a dry run sent nothing.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB through LFS whatever their name
GITATTRIBUTES = b"""*.safetensors filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
"""
LFS_PATTERNS = [line.split()[0].decode() for line in GITATTRIBUTES.splitlines() if line.strip()]
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        return git_blob_oid(self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        return self.commits.get(rev)


@dataclass
class TokenInfo:
    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()


class HubState:
    def __init__(self, tokens: dict[str, TokenInfo]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[tuple[str, str]] = []
        self.lfs_puts: list[str] = []  # oids uploaded through the href
        self.fail_next_commit: int | None = None  # HTTP status to answer the next commit with
        self.lock = threading.RLock()
        self._counter = 0

    def new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}:{self._counter}:{message}".encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, message=message, files=files)
        repo.commits[oid] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Create a repo with the Hub's initial commit (.gitattributes), plus optional extra files."""
        with self.lock:
            repo = Repo(repo_id=repo_id, private=private)
            content = {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}
            first = self.new_commit(repo, None, "initial commit", content)
            repo.refs["main"] = first.oid
            if files:
                blobs = dict(content)
                blobs.update({p: Blob(d, lfs=is_lfs(p, len(d))) for p, d in files.items()})
                for blob in blobs.values():
                    if blob.lfs:
                        self.lfs[blob.sha256] = blob.data
                second = self.new_commit(repo, first.oid, "seed files", blobs)
                repo.refs["main"] = second.oid
            self.repos[repo_id] = repo
            return repo

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        with self.lock:
            commit = self.repos[repo_id].resolve(rev)
            return {p: b.data for p, b in commit.files.items()}


    def create_dataset(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        """A dataset repo (stored as `datasets/{repo_id}`) with `files` on main."""
        return self.create_repo(dataset_key(repo_id), private=private, files=files)

    def add_branch(self, key: str, branch: str, files: dict[str, bytes]) -> Commit:
        """A branch holding exactly `files` (e.g. the Hub's refs/convert/parquet Parquet conversion)."""
        with self.lock:
            repo = self.repos[key]
            blobs = {p: Blob(d, lfs=is_lfs(p, len(d))) for p, d in files.items()}
            for blob in blobs.values():
                if blob.lfs:
                    self.lfs[blob.sha256] = blob.data
            commit = self.new_commit(repo, None, f"branch {branch}", blobs)
            repo.refs[branch] = commit.oid
            return commit


def dataset_key(repo_id: str) -> str:
    return f"datasets/{repo_id}"


def is_lfs(path: str, size: int) -> bool:
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_THRESHOLD or any(fnmatch.fnmatch(name, pat) for pat in LFS_PATTERNS)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubHTTPServer"

    def log_message(self, format, *args):  # keep test output quiet
        pass

    # --- plumbing -----------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if not any(k.lower() == "content-length" for k in (headers or {})):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not (head or self.command == "HEAD") and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _token(self) -> TokenInfo | None:
        """The caller's identity; a token the server does not know is a 401 on every endpoint."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        info = self.state.tokens.get(token)
        if info is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return info

    def _writer(self, namespace: str) -> TokenInfo:
        who = self._token()
        if who is None:
            raise HubError(401, "You must be authenticated to write")
        if not who.write or namespace not in (who.user, *who.orgs):
            raise HubError(403, f'You don\'t have the rights to write to the namespace "{namespace}"')
        return who

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        ns = repo_id.removeprefix("datasets/").split("/")[0]
        who = self._writer(ns) if write else self._token()
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and (who is None or ns not in (who.user, *who.orgs))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.state.lock:
            self.state.requests.append((method, url.path))
        try:
            with self.state.lock:
                self._route(method, parts, query)
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message, **e.extra}, headers)
        except Exception as e:  # a server bug must still answer, or the client would hang
            self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # --- routes -------------------------------------------------------------------------------
    def _route(self, method: str, parts: list[str], query: dict) -> None:
        body = self._body() if method in ("POST", "PUT") else b""
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts[:2] == ["api", "whoami-v2"] and method == "GET":
            who = self._token()
            if who is None:
                raise HubError(401, INVALID_CREDENTIALS)
            return self._json(200, {"type": "user", "name": who.user, "orgs": [{"name": o} for o in who.orgs]})
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body))
        if parts[:2] == ["api", "datasets"] and len(parts) >= 4 and method == "GET":
            key, rest = dataset_key(f"{parts[2]}/{parts[3]}"), parts[4:]
            if not rest or rest[:1] == ["revision"]:
                return self._model_info(key, "/".join(rest[1:]) or "main")
            if rest[:1] == ["tree"]:
                return self._tree(key, rest[1], "/".join(rest[2:]))
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(dataset_key(f"{parts[1]}/{parts[2]}"), parts[4], "/".join(parts[5:]),
                                 head=method == "HEAD")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if not rest and method == "GET":
                return self._model_info(repo_id, "main")
            if rest[:1] == ["revision"] and method == "GET":
                return self._model_info(repo_id, "/".join(rest[1:]))
            if rest[:1] == ["tree"] and method == "GET":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if rest[:1] == ["preupload"] and method == "POST":
                return self._preupload(repo_id, "/".join(rest[1:]), json.loads(body), query)
            if rest[:1] == ["branch"] and method == "POST":
                return self._create_branch(repo_id, "/".join(rest[1:]), json.loads(body or b"{}"))
            if rest[:1] == ["commit"] and method == "POST":
                return self._commit_files(repo_id, "/".join(rest[1:]), body, query)
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if parts[:1] == ["__lfs"] and method == "PUT" and len(parts) == 2:
            return self._lfs_put(parts[1], body)
        if parts == ["__lfs", "verify"] and method == "POST":
            return self._lfs_verify(json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head=method == "HEAD")
        raise HubError(404, f"no route for {method} {self.path}")

    def _create_repo(self, payload: dict) -> None:
        ns, name = payload.get("organization"), payload.get("name")
        if ns is None:
            who = self._token()
            ns = who.user if who else None
        self._writer(ns or "")
        repo_id = f"{ns}/{name}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.state.repos:
            raise HubError(409, "You already created this model repo", extra={"url": url})
        self.state.create_repo(repo_id, private=payload.get("visibility") == "private")
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        if not content.startswith("---"):
            return self._json(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            meta = yaml.safe_load(content.split("---", 2)[1])
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        self._json(200, {"warnings": []})

    def _model_info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, rev)
        siblings = []
        for path, blob in sorted(commit.files.items()):
            s = {"rfilename": path, "size": blob.size, "blobId": blob.oid}
            if blob.lfs:
                s["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": 134}
            siblings.append(s)
        public_id = repo_id.removeprefix("datasets/")
        self._json(200, {"id": public_id, "modelId": public_id, "sha": commit.oid, "private": repo.private,
                         "siblings": siblings, "tags": [], "library_name": None})

    def _tree(self, repo_id: str, rev: str, prefix: str) -> None:
        commit = self._commit(self._repo(repo_id), rev)
        entries, folders = [], set()
        for path, blob in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            segs = path.split("/")
            for i in range(1, len(segs)):
                folders.add("/".join(segs[:i]))
            e = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.lfs:
                e["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": 134}
            entries.append(e)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(200, entries)

    def _preupload(self, repo_id: str, rev: str, payload: dict, query: dict) -> None:
        repo = self._repo(repo_id, write=True)
        commit = self._commit(repo, "main" if query.get("create_pr") else rev)
        files = []
        for f in payload["files"]:
            lfs = is_lfs(f["path"], f["size"])
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.oid})

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: {branch}")
        start = self._commit(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.oid
        self._json(200, {})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        self._repo(repo_id, write=payload.get("operation") == "upload")
        objects = []
        for obj in payload["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                item["actions"] = {"upload": {"href": f"{self.server.url}/__lfs/{obj['oid']}"},
                                   "verify": {"href": f"{self.server.url}/__lfs/verify"}}
            objects.append(item)
        self._json(200, {"transfer": "basic", "objects": objects},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "content does not match its oid")
        self.state.lfs[oid] = body
        self.state.lfs_puts.append(oid)
        self._send(200)

    def _lfs_verify(self, payload: dict) -> None:
        self._token()
        data = self.state.lfs.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, "object not found or size mismatch")
        self._json(200, {})

    def _commit_files(self, repo_id: str, rev: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_id, write=True)
        if self.state.fail_next_commit is not None:
            status, self.state.fail_next_commit = self.state.fail_next_commit, None
            raise HubError(status, "commit failed (injected by the test)")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first ndjson line must be the header")
        header = lines[0]["value"]
        create_pr = query.get("create_pr") == "1"
        parent = self._commit(repo, "main" if create_pr else rev)
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HubError(412, "parentCommit is not the head of the revision")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.state.lfs.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"unknown ndjson key {key}")
        commit = self.state.new_commit(repo, parent.oid, header.get("summary", ""), files)
        reply = {"commitUrl": f"{self.server.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                 "success": True}
        if create_pr:
            repo.prs += 1
            repo.refs[f"refs/pr/{repo.prs}"] = commit.oid
            reply["pullRequestUrl"] = f"{self.server.url}/{repo_id}/discussions/{repo.prs}"
        else:
            repo.refs[rev] = commit.oid
        self._json(200, reply)

    def _resolve(self, repo_id: str, rev: str, path: str, *, head: bool) -> None:
        commit = self._commit(self._repo(repo_id), rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {})
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes",
                   "ETag": f'"{blob.sha256 if blob.lfs else blob.oid}"'}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": blob.size})
        data, status = blob.data, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s)
            end = int(end_s) if end_s else blob.size - 1
            data, status = blob.data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        headers["Content-Length"] = len(data)
        self._send(status, data, headers, head=head)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """Start with `HubServer(tokens).start()`; `.url` is the endpoint, `.state` the repos and log."""

    def __init__(self, tokens: dict[str, TokenInfo]):
        self.state = HubState(tokens)
        self.httpd = HubHTTPServer(self.state)
        self.url = self.httpd.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
