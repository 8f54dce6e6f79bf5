"""Every API call once, as a generator of HTTP steps, shared by both clients.

An operation yields ``Call`` (send this request; the client sends back the
``Reply``) or ``Sleep`` (wait, when polling a job) and returns the result.
``Client`` drives it with httpx's sync client, ``AsyncClient`` with the
async one, so the two never drift apart (no duplicated sync/async bodies).
A reply with status >= 400 never reaches an operation: the driver raises
the mapped ``edgemesh.errors`` class first (``edgemesh.sdk.errors``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from edgemesh.errors import EdgemeshError
from edgemesh.sdk.errors import JobFailedError, JobTimeoutError, error_classes
from edgemesh.sdk.types import Completion, Job, Model, Status

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass(frozen=True)
class Sleep:
    seconds: float


Op = Generator[Call | Sleep, Reply | None, T]


def _get(path: str, **params: Any) -> Call:
    return Call("GET", path, params={k: v for k, v in params.items() if v is not None} or None)


def _body(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


# -- OpenAI routes ------------------------------------------------------------


def models() -> Op[list[Model]]:
    reply = yield _get("/v1/models")
    assert reply is not None
    return [Model.from_dict(m) for m in reply.json()["data"]]


def completion_call(model: str, prompt: str | list[int], stream: bool, **params: Any) -> Call:
    body = _body(model=model, prompt=prompt, **params)
    if stream:
        body["stream"] = True
    return Call("POST", "/v1/completions", json=body)


def chat_call(
    model: str, messages: Sequence[Mapping[str, Any]], stream: bool, **params: Any
) -> Call:
    body = _body(model=model, messages=[dict(m) for m in messages], **params)
    if stream:
        body["stream"] = True
    return Call("POST", "/v1/chat/completions", json=body)


def single(call: Call) -> Op[Completion]:
    reply = yield call
    assert reply is not None
    return Completion.from_dict(reply.json())


# -- /v2: graph models --------------------------------------------------------


def infer(model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None) -> Op[Any]:
    from edgemesh.sdk.oip import decode_response, encode_request

    content, headers = encode_request(inputs, outputs)
    reply = yield Call(
        "POST", f"/v2/models/{quote(model, safe='')}/infer", content=content, headers=headers
    )
    assert reply is not None
    return decode_response(reply.content, reply.headers)


def graph_metadata(model: str) -> Op[dict[str, Any]]:
    reply = yield _get(f"/v2/models/{quote(model, safe='')}")
    assert reply is not None
    return reply.json()


# -- /api: the management API (docs/API.md) ------------------------------------


def status() -> Op[Status]:
    overview = yield _get("/api/overview")
    boxes = yield _get("/api/boxes")
    assert overview is not None and boxes is not None
    return Status.from_dicts(overview.json(), boxes.json())


def plan(package: str, box: str | None, name: str | None) -> Op[dict[str, Any]]:
    reply = yield Call("POST", "/api/plan", json=_body(package=package, box=box, name=name))
    assert reply is not None
    return reply.json()["plan"]


def deploy(
    package: str,
    *,
    name: str | None,
    box: str | None,
    plan: dict[str, Any] | None,
    wait: bool,
    timeout_s: float,
    poll_s: float,
) -> Op[Job]:
    reply = yield Call(
        "POST", "/api/models", json=_body(package=package, name=name, box=box, plan=plan)
    )
    assert reply is not None
    job = Job.from_dict(reply.json()["job"])
    return (yield from wait_job(job, timeout_s, poll_s)) if wait else job


def undeploy(name: str, *, wait: bool, timeout_s: float, poll_s: float) -> Op[Job]:
    reply = yield Call("DELETE", f"/api/models/{quote(name, safe='')}")
    assert reply is not None
    job = Job.from_dict(reply.json()["job"])
    return (yield from wait_job(job, timeout_s, poll_s)) if wait else job


def job(job_id: str) -> Op[Job]:
    reply = yield _get(f"/api/jobs/{quote(job_id, safe='')}")
    assert reply is not None
    return Job.from_dict(reply.json())


def wait_job(job: Job, timeout_s: float, poll_s: float) -> Op[Job]:
    """Poll ``job`` until it is no longer running; raise if it failed."""
    deadline = time.monotonic() + timeout_s
    while job.state == "running":
        if time.monotonic() > deadline:
            raise JobTimeoutError(
                f"{job.kind} of '{job.target}' still running after {timeout_s:.0f} s",
                job=job,
                hint=f"poll client.job('{job.id}') or pass a longer timeout_s",
            )
        yield Sleep(poll_s)
        reply = yield _get(f"/api/jobs/{quote(job.id, safe='')}")
        assert reply is not None
        job = Job.from_dict(reply.json())
    if job.state == "failed":
        raise job_error(job)
    return job


def job_error(job: Job) -> EdgemeshError:
    """The error of a failed job: its ``edgemesh.errors`` class when the gateway
    names it, else ``JobFailedError``; either way ``.job`` holds the job."""
    from edgemesh.sdk.errors import _make

    message = f"{job.kind} of '{job.target}' failed: {job.message}"
    cls = error_classes().get(job.error or "")
    exc = _make(cls, message) if cls is not None else JobFailedError(message, job=job)
    exc.job = job  # type: ignore[attr-defined]
    return exc
