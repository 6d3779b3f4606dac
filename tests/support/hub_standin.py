"""A stand-in for the Hugging Face Hub's HTTP API, on loopback, for download tests.

It serves what huggingface_hub 2.4 asks of the Hub when it downloads a model:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``
  (``model_info``/``repo_info``): ``sha``, ``gated`` and ``siblings`` (with
  ``size``, ``blobId`` and ``lfs`` when asked ``?blobs=true``);
- ``GET /api/models/{repo}/tree/{rev}?recursive=true`` (``list_repo_tree``,
  ``list_repo_files``, ``snapshot_download``): files and folders;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a small file is answered
  directly with ``ETag`` (its git blob id), ``X-Repo-Commit`` and
  ``Content-Length``; an LFS file (weights) is a 302 to the "CDN" with
  ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``, as the Hub does;
- the CDN, on a port of its own so that it is another origin, as the Hub's is:
  huggingface_hub then neither follows the redirect in its HEAD call nor sends
  the token there. It honours ``Range``.

No ``X-Xet-*`` headers and no ``xetHash`` fields: these files are plain HTTP
downloads. Errors carry the Hub's ``X-Error-Code``/``X-Error-Message`` headers,
which huggingface_hub turns into its typed errors (``GatedRepoError``, ...).
A gated repository's metadata and file list are public; its files answer 401
without a token and 403 with a token that was not granted access.

``cut_transfer`` makes the CDN drop a file's connection part-way, then refuse
that file until ``restore``; ``stall_transfer`` makes it send part of a file and
then nothing more (until the client hangs up, or 60 s). Every request is recorded in ``requests``. The
servers run on a thread of their own, as tests block while they poll runners.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
from dataclasses import dataclass, field

from aiohttp import web

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


@dataclass(frozen=True)
class HubFile:
    path: str
    content: bytes

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def blob_id(self) -> str:
        """The git blob id: what the Hub sends as a small file's ETag."""
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()

    @property
    def sha256(self) -> str:
        """The LFS object id: what the Hub sends as an LFS file's X-Linked-Etag."""
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    gated: bool = False
    granted_tokens: frozenset[str] = frozenset()
    commit: str = field(default_factory=lambda: secrets.token_hex(20))

    @classmethod
    def from_contents(cls, repo_id: str, contents: dict[str, bytes], **kwargs) -> HubRepo:
        return cls(repo_id, {path: HubFile(path, data) for path, data in contents.items()}, **kwargs)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None

    @property
    def is_cdn(self) -> bool:
        return self.path.startswith("/repos/")


@dataclass
class CutTransfer:
    repo_id: str
    path: str
    after_bytes: int
    cut_done: bool = False
    stall: bool = False  # send after_bytes, then nothing (each time), instead of dropping the connection


class HubError(Exception):
    """An error answer, with the headers huggingface_hub reads to pick its error type."""

    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.response = web.json_response(
            {"error": message}, status=status, headers={**headers, "X-Error-Code": code, "X-Error-Message": message}
        )


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a ``bytes=first-[last]`` header; None for the whole file."""
    if not header or not header.startswith("bytes="):
        return None
    first_text, _, last_text = header.removeprefix("bytes=").partition("-")
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    return first, min(last, size - 1)


class HubStandin:
    """The Hub API and its CDN, each on a loopback port of its own."""

    def __init__(self, repos: list[HubRepo]) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.requests: list[RecordedRequest] = []
        self.cuts: dict[str, CutTransfer] = {}  # by repo id
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="hub-standin", daemon=True)
        self.app_runners: list[web.AppRunner] = []
        self.url = ""
        self.cdn_url = ""

    # Lifecycle

    def start(self) -> HubStandin:
        self.thread.start()
        self.url, self.cdn_url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.app_runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def _start(self) -> tuple[str, str]:
        hub = web.Application(middlewares=[self.record])
        hub.router.add_get("/api/models/{org}/{name}", self.model_info)
        hub.router.add_get("/api/models/{org}/{name}/revision/{revision}", self.model_info)
        hub.router.add_get("/api/models/{org}/{name}/tree/{revision}", self.tree)
        hub.router.add_route("HEAD", "/{org}/{name}/resolve/{revision}/{path:.+}", self.resolve)
        hub.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self.resolve, allow_head=False)
        cdn = web.Application(middlewares=[self.record])
        cdn.router.add_route("HEAD", "/repos/{org}/{name}/{sha256}", self.cdn_object)
        cdn.router.add_get("/repos/{org}/{name}/{sha256}", self.cdn_object, allow_head=False)
        return await self._serve(hub), await self._serve(cdn)

    async def _stop(self) -> None:
        for runner in self.app_runners:
            await runner.cleanup()

    # Test controls

    def cut_transfer(self, repo_id: str, path: str, after_bytes: int) -> None:
        """The next GET of the file sends `after_bytes` then drops; later ones drop at once, until restore()."""
        self.cuts[repo_id] = CutTransfer(repo_id, path, after_bytes)

    def stall_transfer(self, repo_id: str, path: str, after_bytes: int) -> None:
        """Every GET of the file sends `after_bytes`, then nothing more, until restore()."""
        self.cuts[repo_id] = CutTransfer(repo_id, path, after_bytes, stall=True)

    def restore(self, repo_id: str) -> None:
        self.cuts.pop(repo_id, None)

    def requests_for(self, repo_id: str, since: int = 0) -> list[RecordedRequest]:
        """The requests about one repo, from the `since`-th request the stand-in received on."""
        return [request for request in self.requests[since:] if f"/{repo_id}/" in request.path]

    def downloads(self, repo_id: str, since: int = 0) -> list[tuple[str, str | None]]:
        """(file, Range header) of every GET of a file's content, from the resolve URL or the CDN."""
        repo = self.repos[repo_id]
        by_sha256 = {file.sha256: file.path for file in repo.files.values()}
        fetched = []
        for request in self.requests_for(repo_id, since):
            if request.method != "GET":
                continue
            if request.is_cdn:
                fetched.append((by_sha256[request.path.rsplit("/", 1)[1]], request.range))
            elif "/resolve/" in request.path:
                fetched.append((request.path.split("/resolve/", 1)[1].split("/", 1)[1], request.range))
        return fetched

    # Handlers

    @web.middleware
    async def record(self, request: web.Request, handler) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(
                request.method, request.path, request.headers.get("Range"), request.headers.get("Authorization")
            )
        )
        try:
            return await handler(request)
        except HubError as error:
            return error.response

    def repo(self, request: web.Request) -> HubRepo:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        if repo_id not in self.repos:
            # The Hub answers 401 for a missing repo, so as not to tell it from a private one.
            raise HubError(401, "RepoNotFound", "Repository not found")
        return self.repos[repo_id]

    def check_revision(self, repo: HubRepo, revision: str) -> None:
        if revision not in ("main", repo.commit):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    async def model_info(self, request: web.Request) -> web.Response:
        repo = self.repo(request)
        self.check_revision(repo, request.match_info.get("revision", "main"))
        with_blobs = request.query.get("blobs", "").lower() == "true"
        siblings = []
        for file in repo.files.values():
            sibling: dict = {"rfilename": file.path}
            if with_blobs:
                sibling.update(size=len(file.content), blobId=file.blob_id)
                if file.is_lfs:
                    sibling["lfs"] = {"sha256": file.sha256, "size": len(file.content), "pointerSize": 134}
            siblings.append(sibling)
        return web.json_response(
            {
                "_id": repo.commit[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": ["safetensors", "llama", "text-generation"],
                "pipeline_tag": "text-generation",
                "library_name": "transformers",
                "siblings": siblings,
            }
        )

    async def tree(self, request: web.Request) -> web.Response:
        repo = self.repo(request)
        self.check_revision(repo, request.match_info["revision"])
        entries = []
        folders = sorted({path.rsplit("/", 1)[0] for path in repo.files if "/" in path})
        for folder in folders:
            tree_id = hashlib.sha1(folder.encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_id, "size": 0, "path": folder})
        for file in repo.files.values():
            entry = {"type": "file", "oid": file.blob_id, "size": len(file.content), "path": file.path}
            if file.is_lfs:
                entry["lfs"] = {"oid": file.sha256, "size": len(file.content), "pointerSize": 134}
            entries.append(entry)
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self.repo(request)
        self.check_revision(repo, request.match_info["revision"])
        commit_header = {"X-Repo-Commit": repo.commit}
        if repo.gated:
            authorization = request.headers.get("Authorization", "")
            if not authorization:
                raise HubError(
                    401,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                    **commit_header,
                )
            if authorization.removeprefix("Bearer ") not in repo.granted_tokens:
                raise HubError(
                    403,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo.repo_id} to ask for access.",
                    **commit_header,
                )
        file = repo.files.get(request.match_info["path"])
        if file is None:
            raise HubError(404, "EntryNotFound", f"{request.match_info['path']} does not exist", **commit_header)
        if file.is_lfs:
            location = f"{self.cdn_url}/repos/{repo.repo_id}/{file.sha256}"
            return web.Response(
                status=302,
                text=f"Found. Redirecting to {location}",
                headers={
                    **commit_header,
                    "Location": location,
                    "ETag": f'"{file.blob_id}"',
                    "X-Linked-Etag": f'"{file.sha256}"',
                    "X-Linked-Size": str(len(file.content)),
                },
            )
        headers = {**commit_header, "ETag": f'"{file.blob_id}"', "Accept-Ranges": "bytes"}
        return await self.send(request, file, headers)

    async def cdn_object(self, request: web.Request) -> web.StreamResponse:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        files = repo.files.values() if repo else []
        file = next((file for file in files if file.sha256 == request.match_info["sha256"]), None)
        if file is None:
            raise web.HTTPNotFound()
        cut = self.cuts.get(repo_id)
        if request.method == "GET" and cut and cut.path == file.path:
            return await self.send_cut(request, file, cut)
        return await self.send(request, file, {"ETag": f'"{file.sha256}"', "Accept-Ranges": "bytes"})

    async def send(self, request: web.Request, file: HubFile, headers: dict[str, str]) -> web.Response:
        size = len(file.content)
        wanted = byte_range(request.headers.get("Range"), size)
        if wanted is None:
            status, body = 200, file.content
        else:
            first, last = wanted
            if first >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status, body = 206, file.content[first : last + 1]
            headers = {**headers, "Content-Range": f"bytes {first}-{last}/{size}"}
        headers["Content-Type"] = "application/octet-stream"
        # aiohttp answers a HEAD with this Content-Length and no body.
        return web.Response(status=status, body=body, headers=headers)

    async def send_cut(self, request: web.Request, file: HubFile, cut: CutTransfer) -> web.StreamResponse:
        """A connection lost mid-transfer: part of the body, then the socket closes (or, stalled, stays silent)."""
        if cut.cut_done and not cut.stall:
            request.transport.close()  # no answer at all: the network is still down
            return web.Response()  # never sent
        cut.cut_done = True
        first = (byte_range(request.headers.get("Range"), len(file.content)) or (0, 0))[0]
        body = file.content[first:]
        response = web.StreamResponse(
            status=206 if first else 200,
            headers={"ETag": f'"{file.sha256}"', "Content-Type": "application/octet-stream"},
        )
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: cut.after_bytes])
        if cut.stall:  # until restore(), the client hangs up, or 60 s
            for _ in range(600):
                if self.cuts.get(cut.repo_id) is not cut or request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.1)
        request.transport.close()
        return response
