"""The FastAPI app: OpenAI's chat-completions protocol over a Chat engine.

Each request is stateless: its messages are replayed into a fresh Chat session on the worker
thread, then the answer is generated there, piece by piece, and sent back as one JSON body or as
server-sent events. The event loop only parses, fetches images and waits.

What a hostile client can do is bounded before it costs anything: the Host header is checked
first (`HostCheck`, against DNS rebinding), then the API key from the headers alone, then the
body's size while it streams in (`BodyLimit`); the body is parsed on a worker thread, after a check
of how much JSON structure it holds, so a request of millions of tiny messages is refused before it
is built and the event loop keeps answering (`/health` too). A request's size is then bounded
(`RequestLimits`) before it takes a place in the queue; it holds that place while its images are
fetched. A client that goes away stops its request in every phase: fetching, waiting, replaying the
history, generating.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minigpt4.chat import Chat, ChatSession
from minigpt4.errors import InputError
from minigpt4.generation import GenerationParams
from minigpt4.hosts import AllowedHosts, HostCheck
from minigpt4.serve.messages import ImagePolicy, RequestLimits, Turn, fetch_images, replay, to_turns
from minigpt4.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    FinishReason,
    ModelCard,
    ModelList,
    Usage,
    completion_id,
    now,
)
from minigpt4.serve.scheduler import Failed, Job, Overloaded, Scheduler

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a request waiting on the model checks that its client is still there


@dataclass
class Finished:
    """The event a job ends with when the answer is complete."""

    finish_reason: FinishReason
    usage: Usage


def create_app(
    chat: Chat,
    *,
    max_image_bytes: int | None = None,
    api_key: str | None = None,
    max_queue: int = 4,
    max_running: int | None = None,
    local_image_dir: Path | None = None,
    allow_http_images: bool = False,
    max_request_bytes: int | None = None,
    limits: RequestLimits | None = None,
    image_fetch_timeout_s: float = 10.0,
    allow_private_images: bool = False,
    allowed_hosts: AllowedHosts | None = None,
) -> FastAPI:
    """An app serving `chat` as the model named `chat.preset_name`.

    Up to `max_running` requests run at once (default: as many answers as the engine decodes
    together); `max_queue` more may wait; more get 429. With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>`. Images come as data: URLs; file paths under
    `local_image_dir` and http(s) URLs only when enabled. Images are capped at `max_image_bytes`
    (default: the preset's limit) and request bodies at `max_request_bytes` (default: four images
    at the byte limit, base64-encoded); `limits` bound the messages, text and images of a request.
    An http(s) image must arrive within `image_fetch_timeout_s` in all; redirects are refused, and
    so are hosts that resolve to a loopback, private or other non-public address unless
    `allow_private_images`. Requests addressed to a host name not in `allowed_hosts` (default:
    `localhost` and the environment's names; IP addresses always) get 400. With `api_key`, the
    docs (`/docs`, `/openapi.json`) need the key too.
    """
    max_image_bytes = max_image_bytes or chat.max_image_bytes
    model_name = chat.preset_name
    started = now()
    scheduler = Scheduler(max_waiting=max_queue, workers=max_running or chat.max_concurrent_answers)
    images = ImagePolicy(
        max_image_bytes, local_image_dir, allow_http_images, image_fetch_timeout_s, allow_private_images
    )
    limits = limits or RequestLimits()
    keyed = [Depends(_bearer_check(api_key))] if api_key else []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()

    # With a key, the docs are served by routes of our own behind it.
    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="MiniGPT-4", lifespan=lifespan, **docs)
    # Added last, so it runs first: a request for a foreign host name is refused before anything else.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes or 4 * (max_image_bytes * 4 // 3) + 2**20)
    app.add_middleware(HostCheck, allowed=allowed_hosts or AllowedHosts.for_server(None))
    _add_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=keyed)
    if api_key:
        _add_keyed_docs(app, keyed)

    @app.get("/health")
    async def health() -> dict[str, object]:
        return {"status": "ok", "model": model_name, **scheduler.status(), "capacity": scheduler.capacity}

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=started)])

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        _check_model(model_id, model_name)
        return ModelCard(id=model_name, created=started)

    @v1.post(
        "/chat/completions",
        response_model=None,
        responses={200: {"model": ChatCompletion}},
        openapi_extra={"requestBody": _REQUEST_BODY_SCHEMA},
    )
    async def chat_completions(request: Request) -> Response:
        # The body is read here, after the key was checked from the headers (FastAPI reads a
        # declared body before any dependency), and parsed off the event loop.
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone, or cut off by BodyLimit (which has answered 413)
            return Response(status_code=499)
        body = await asyncio.to_thread(parse_request, raw, limits)
        _check_model(body.model, model_name)
        params = _generation_params(chat.defaults, body)
        turns = to_turns(body.messages)
        try:
            job = scheduler.admit()  # fetching images takes a place in the queue too
        except Overloaded as e:
            raise APIError(
                429,
                str(e),
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from e
        try:
            if not await _unless_gone(fetch_images(turns, images), request):
                return Response(status_code=499)  # the client has gone; nobody reads this
            scheduler.start(job, partial(_generate, chat, turns, params))
        finally:
            scheduler.withdraw(job)  # only if it never started
        # The first event comes after the prompt is encoded, so bad input still gets a 4xx status.
        first = await _next_event(job, request)
        if first is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        if isinstance(first, Failed):
            return _error_response(_api_error(first.error))
        meta = _Meta(completion_id(), now(), model_name)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _sse(job, first, meta, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _whole_answer(job, first, meta, request)

    app.include_router(v1)
    _share_schemas(app)
    return app


_REQUEST_BODY_SCHEMA = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
}


def parse_request(raw: bytes, limits: RequestLimits) -> ChatCompletionRequest:
    """The request a body holds, checked against `limits`; an `APIError` (400) naming what is wrong.

    The amount of JSON structure is bounded before parsing (`RequestLimits.check_body`), so the
    work and memory of parsing stay proportional to what the server would accept.
    """
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
    limits.check_body(raw)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 ({e.reason})", code="invalid_json") from e
    except json.JSONDecodeError as e:
        position = len(e.doc[: e.pos].encode("utf-8", "surrogatepass"))  # characters → bytes
        raise APIError(400, f"invalid JSON at byte {position}: {e.msg}", code="invalid_json") from e
    except RecursionError as e:
        raise APIError(400, "the request body nests too deeply", code="invalid_json") from e
    try:
        body = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from e
    limits.check(body.messages, body.stop_strings)
    return body


def _add_keyed_docs(app: FastAPI, keyed: list) -> None:
    """`/openapi.json` and `/docs` behind the API key (send it as for /v1)."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=keyed)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=keyed)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="MiniGPT-4 API")


def _share_schemas(app: FastAPI) -> None:
    """Put the request model into the OpenAPI components (the route reads its body by hand)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            defs = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(defs.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = defs
        return app.openapi_schema

    app.openapi = openapi


@dataclass(frozen=True)
class _Meta:
    id: str
    created: int
    model: str

    def chunk(
        self, delta: Delta | None, finish_reason: FinishReason | None = None, usage: Usage | None = None
    ) -> str:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish_reason)]
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return _sse_event(chunk)


def _sse_event(payload: BaseModel | dict[str, object]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _sse(job: Job, first: str | Finished, meta: _Meta, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk stream: the role, the text pieces, the finish reason, [usage,] [DONE]."""
    try:
        yield meta.chunk(Delta(role="assistant", content=""))
        event = first
        while isinstance(event, str):
            yield meta.chunk(Delta(content=event))
            event = await job.next_event()
        if isinstance(event, Failed):
            yield _sse_event(_api_error(event.error).body())
            return
        yield meta.chunk(Delta(), finish_reason=event.finish_reason)
        if include_usage:
            yield meta.chunk(None, usage=event.usage)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client left (or all is sent): stop generating


async def _whole_answer(job: Job, first: str | Finished, meta: _Meta, request: Request) -> Response:
    """Wait for all the pieces, then send the answer as one `chat.completion` body."""
    pieces: list[str] = []
    event: object = first
    while isinstance(event, str):
        pieces.append(event)
        event = await _next_event(job, request)
    if event is None:
        return Response(status_code=499)
    if isinstance(event, Failed):
        return _error_response(_api_error(event.error))
    assert isinstance(event, Finished)
    choice = Choice(message=AssistantMessage(content="".join(pieces)), finish_reason=event.finish_reason)
    completion = ChatCompletion(
        id=meta.id, created=meta.created, model=meta.model, choices=[choice], usage=event.usage
    )
    return Response(completion.model_dump_json(), media_type="application/json")


async def _unless_gone(work: Awaitable[None], request: Request) -> bool:
    """Await `work` (its errors propagate); False, with `work` cancelled, once the client has gone."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                task.result()
                return True
            if await request.is_disconnected():
                return False
    finally:
        task.cancel()


async def _next_event(job: Job, request: Request) -> object | None:
    """The job's next event, or None (and the job cancelled) once the client has gone away."""
    while not await request.is_disconnected():
        try:
            return await asyncio.wait_for(job.next_event(), DISCONNECT_POLL_S)
        except TimeoutError:
            continue
    job.cancel()
    return None


def _generate(chat: Chat, turns: Sequence[Turn], params: GenerationParams, job: Job) -> None:
    """On the worker thread: replay the conversation and stream the answer into the job's events."""
    session = chat.new_session()
    if not replay(chat, session, turns, cancelled=lambda: job.cancelled):
        return  # the client has gone
    pieces = chat.stream_answer(session, params)
    try:
        for piece in pieces:
            if job.cancelled:
                return
            if piece:
                job.emit(piece)
    finally:
        pieces.close()  # stops generation when the client has gone
    job.emit(_finished(session))


def _finished(session: ChatSession) -> Finished:
    """Token counts and why the answer ended: the engine's result of the session's last answer."""
    result = session.last_result
    reason = "length" if result.finish_reason == "length" else "stop"
    return Finished(reason, Usage.of(result.prompt_tokens, result.answer_tokens))


def _generation_params(defaults: GenerationParams, body: ChatCompletionRequest) -> GenerationParams:
    """The preset's decoding settings with the request's changes; temperature 0 means greedy."""
    changes: dict[str, object] = {"num_beams": 1}  # streaming needs one beam; OpenAI's API has no beams
    if body.temperature == 0:
        changes["do_sample"] = False
    elif body.temperature is not None:
        changes.update(do_sample=True, temperature=body.temperature)
    if body.top_p is not None:
        changes["top_p"] = body.top_p
    if body.token_limit is not None:
        changes["max_new_tokens"] = body.token_limit
    if body.stop_strings:
        changes["stop"] = body.stop_strings
    try:
        return dataclasses.replace(defaults, **changes)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404,
            f"the model {requested!r} does not exist; this server has {served!r}",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )


def _bearer_check(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets a request through only with `Authorization: Bearer <api_key>`.

    The scheme is case-insensitive, as HTTP says (`bearer` and `BEARER` work too).
    """
    expected = api_key.encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization")
        if given is None:
            raise _unauthorized("no API key given; send the header 'Authorization: Bearer <key>'")
        scheme, _, key = given.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise _unauthorized("the Authorization header must read 'Bearer <key>'")
        if not secrets.compare_digest(key.strip().encode(), expected):
            raise _unauthorized("the API key is not valid")

    return check


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _api_error(error: Exception) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, InputError):
        return APIError(400, str(error))
    return APIError(500, "the server failed to answer; see its log", type="server_error")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's `{"error": {...}}` body."""

    @app.exception_handler(Exception)
    async def any_error(_request: Request, error: Exception) -> JSONResponse:
        return _error_response(_api_error(error))

    @app.exception_handler(APIError)
    @app.exception_handler(InputError)
    async def known_error(_request: Request, error: Exception) -> JSONResponse:
        return _error_response(_api_error(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(error.status_code, str(error.detail), type=kind))


_UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "function-after", "function-before"}


def _validation_error(errors: Sequence[dict]) -> APIError:
    """A 400 naming the first problem of a request: where it is (`messages[0].content`) and what."""
    first = errors[0]
    where = ""
    for part in first["loc"][1:] if first["loc"][:1] == ("body",) else first["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part not in _UNION_BRANCHES and "[" not in str(part):  # pydantic's labels of union branches
            where += f".{part}" if where else str(part)
    message = first["msg"].removeprefix("Value error, ")
    if not where:
        return APIError(400, f"the request body: {message}")
    return APIError(400, f"{where}: {message}", param=where)


class BodyLimit:
    """ASGI middleware: refuses request bodies over `max_bytes` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413,
            f"the request body is over this server's limit of {self.max_bytes} bytes",
            code="request_too_large",
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _error_response(too_large)(scope, receive, send)
            return
        received = 0
        refused = False

        async def counting_receive() -> Message:
            # A streamed body is refused mid-way: answer 413 now, and tell the app its client has gone.
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes and not refused:
                refused = True
                await _error_response(too_large)(scope, receive, send)
            return {"type": "http.disconnect"} if refused else message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
