"""``vpdsr upscale --server URL``: the batch upscaled by a running ``vpdsr serve``, not here.

The standard library's urllib only: the runtime install has no HTTP client (httpx is a test
dependency), and the client never imports ``service``. It lives outside ``model`` so that the
model package does not hard-code the service's wire protocol (``model.cli`` imports it only for
``--server``); it uses ``model``'s batch, error and image types. The protocol is the public API of
docs/service.md: ``POST /v1/upscale`` with the image as the raw body; an image too large for a
synchronous request (413 ``too_large_for_sync``) goes to ``POST /v1/jobs`` with an
Idempotency-Key, and the job is polled until its result can be fetched.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

from PIL import Image

from model.batch import InputFailed, Progress, Upscaled
from model.errors import VPDSRError
from model.images import OutputFormat

TIMEOUT_S = 600  # one synchronous request: upload, queue and compute (the server's own limit is 60 s)
RETRIES = 5  # resends of an answer with Retry-After (busy server, Redis briefly away)
MAX_WAIT_S = 60
POLL_S = 1.0

# Errors about the server or the command, not the image: every image would meet them, so the
# command stops rather than report the same error once per file.
FATAL_CODES = frozenset({"unauthorized", "not_found", "model_not_found", "model_not_loaded", "invalid_model_ref"})


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ServerError(InputFailed):
    """The server refused or failed this image; ``code`` is the API's error code."""

    def __init__(self, answer: Answer) -> None:
        try:
            error = answer.json()["error"]
            self.code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):  # not the API's error shape, e.g. a proxy's page
            self.code, message = f"http_{answer.status}", answer.body[:200].decode("utf-8", "replace")
        super().__init__(f"server answered {answer.status} {self.code}: {message}")


class RemoteUpscaler:
    """Upscales each image on the server at ``url``, with ``options`` as the API's query parameters."""

    def __init__(self, url: str, api_key: str | None, options: dict[str, object]) -> None:
        self.url = url.rstrip("/")
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.options = {name: value for name, value in options.items() if value is not None}

    def __call__(self, source: Path, out: BinaryIO, fmt: OutputFormat, progress: Progress) -> Upscaled:
        data = source.read_bytes()
        query = urlencode(self.options | {"format": fmt})
        try:
            answer = self._send("POST", f"/v1/upscale?{query}", data)
        except ServerError as exc:
            if exc.code != "too_large_for_sync":
                raise
            answer = self._via_job(f"/v1/jobs?{query}", data, progress, exc)
        out.write(answer.body)
        with Image.open(io.BytesIO(answer.body)) as result:
            size = result.size
        model = f"{answer.headers.get('X-Model')}:{answer.headers.get('X-Model-Version')}"
        steps, seed = answer.headers.get("X-Steps"), answer.headers.get("X-Seed")
        return Upscaled(size, f"{model}, {steps} step(s), seed {seed}, {self.url}")

    def _via_job(self, path: str, data: bytes, progress: Progress, too_large: ServerError) -> Answer:
        """Submit, poll, fetch. One Idempotency-Key for the submission and all its resends: a
        resend whose first try did reach Redis finds that job instead of queueing a second."""
        try:
            job = self._send("POST", path, data, {"Idempotency-Key": uuid.uuid4().hex}).json()
        except ServerError as exc:
            if exc.code == "jobs_disabled":  # no job queue: the 413 says what to do instead
                raise too_large from None
            raise
        while True:
            if job.get("progress"):  # {"done": tiles, "total": tiles}, where the server reports it
                progress(job["progress"]["done"], job["progress"]["total"])
            if job["state"] not in ("queued", "running"):
                break
            time.sleep(POLL_S)
            job = self._send("GET", job["status_url"]).json()
        if job["state"] != "succeeded":
            reason = (job.get("error") or {}).get("message", "no reason given")
            raise InputFailed(f"job {job['id']} {job['state']}: {reason}")
        return self._send("GET", job["result_url"])

    def _send(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
        """The answer of a successful request, resent after ``Retry-After`` while the server is
        busy; :class:`ServerError` for this image's failure, :class:`VPDSRError` to stop."""
        attempt = 0
        while True:
            answer = self._request(method, path, body, headers or {})
            if answer.status < 400:
                return answer
            error = ServerError(answer)
            if error.code in FATAL_CODES:
                raise VPDSRError(f"{self.url}: {error}")
            retry_after = answer.headers.get("Retry-After")
            if answer.status not in (429, 503) or retry_after is None or attempt == RETRIES:
                raise error
            attempt += 1
            time.sleep(min(float(retry_after), MAX_WAIT_S))

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        if body is not None:  # the server recognises the format from the bytes
            headers = {"Content-Type": "application/octet-stream"} | headers
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=self.auth | headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Answer(exc.code, exc.headers, exc.read())
        except urllib.error.URLError as exc:
            raise VPDSRError(f"cannot reach the server at {self.url}: {exc.reason}") from None
        except TimeoutError:
            raise InputFailed(f"no answer from {self.url} within {TIMEOUT_S} s") from None
