"""``python -m spellxfer serve``: the fine-tuned model behind an OpenAI-compatible LitServe API.

Routes (all on one LitServe server, one request queue, one set of inference workers):

- ``POST /v1/chat/completions`` — OpenAI chat completions (the ``openai`` client works against it;
  ``stream: true`` too: tokens are sent as they are generated, all chunks of a stream under one
  id; see :mod:`spellxfer.serving.streaming`). ``temperature`` 0 means greedy; unset sampling
  fields take the configured defaults (T 0.6, top-p 0.95, top-k 20, min-p 0); ``seed`` and
  ``stop`` are honoured; ``finish_reason`` is ``length`` at the token cap; ``usage`` counts the
  generated token ids.
- ``POST /predict`` — ``{"question": …, "task": "position"|"count"}`` →
  ``{"answer": <reply up to end of turn>, "parsed": <letter, number or null>, "latency_ms": …}``;
  ``parsed`` uses the same answer parser as ``evaluate``.
- ``GET /v1/models`` and ``/v1/models/{id}`` — the one served model, as OpenAI lists models;
- ``GET /health`` (200 once the model is loaded), ``GET /metrics`` (Prometheus, see monitoring.py),
  ``GET /openapi.json``, ``/docs``, ``/redoc`` (the schema and its viewers, behind the same key).

Lifecycle of a request (LitAPI's, one hook per step):

1. HTTP process — :class:`SpellxferSpec` parses the body and applies the limits and the
   non-thinking policy (:mod:`spellxfer.serving.protocol`): a bad request is a 4xx here and
   never reaches the model; bearer-token auth is :meth:`SpellxferAPI.authorize`;
2. inference worker — ``setup`` loads the model once (+ adapter); ``decode_request`` turns a request
   into a conversation and its sampling settings; ``predict`` generates a whole batch (up to
   ``max_batch_size`` requests collected within ``batch_timeout``) with the shared
   :class:`~spellxfer.models.generation.GenerationEngine` and yields each step's new text for
   streamed requests while it does (LitServe's streaming loops send every yield at once), then
   the replies; ``encode_response`` passes them on.
   A request whose generation fails gets its own 500; the rest of its batch is served (``predict``
   retries a failed group one request at a time, so only the culprit fails).
3. HTTP process — the route turns the worker's messages into the OpenAI objects (LitServe's
   pydantic models). Queueing a request for the workers is the one step LitServe 0.2 has no
   public call for: :func:`_queued` holds it alone.

Message content is tokenized as plain text (:func:`~spellxfer.tasks.chat.chat_token_ids`):
``<|im_end|>`` or ``<think>`` typed by a client are characters, never control tokens, so a
message cannot close its turn, fake an assistant turn or open a think block.

Exposure: ``serve`` listens on 127.0.0.1 unless told otherwise, and refuses to listen anywhere
else without an API key (``$SPELLXFER_API_KEY`` or ``--api-key-file``; ``--api-key`` works but
shows in ``ps``).

Non-thinking is enforced twice: requests that ask for thinking are refused with a 400, and every
Qwen3 prompt is rendered with spellxfer's template, whose empty think block has no off switch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import litserve as ls
from fastapi import BackgroundTasks, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from litserve.specs.openai import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamingChoice,
    ChatMessage,
    ChoiceDelta,
    OpenAISpec,
    UsageInfo,
)
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import ValidationError
from rich.console import Console
from starlette.exceptions import HTTPException as StarletteHTTPException

from spellxfer.core.errors import SpellxferError
from spellxfer.serving.protocol import (
    ApiError,
    Limits,
    PredictRequest,
    answer_kind,
    message_text,
    parse_chat,
    parse_predict,
    resolve_api_key,
    validation_message,
)
from spellxfer.serving.scaling import DEFAULT_CONFIG, ServingSettings, load_config
from spellxfer.serving.streaming import StreamedReply, chat_content, streamed_steps, token_pieces
from spellxfer.tasks.chat import chat_token_ids
from spellxfer.tasks.parsing import parse_answer, strip_end_of_turn

LOOPBACK = ("127.0.0.1", "::1", "localhost")
GENERATION_FAILED = ("generation failed for this request (the server log has the cause); "
                     "the other requests of its batch were served")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One request as the inference worker sees it."""

    kind: str  # "chat" or "predict"
    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: object  # spellxfer.models.generation.Sampling (hashable: requests batch by it)
    answer_kind: str | None = None  # predict only: "letter" or "integer"
    error: str | None = None  # set when decoding the request failed: predict skips it
    stop: tuple[str, ...] = ()  # chat only: the reply ends before the first of these
    seeded: bool = False  # the request gave `seed`: generated alone, with that seed (reproducible)
    stream: bool = False  # chat only: the reply is sent token by token as it is generated


# ---- the one place that reaches into LitServe's internals --------------------------------------
@asynccontextmanager
async def _queued(spec: OpenAISpec, payload) -> AsyncIterator[AsyncIterator[tuple[object, LitAPIStatus]]]:
    """Queue ``payload`` for the inference workers; yields the stream of ``(data, status)`` the
    workers send back for it, and forgets the request on exit.

    LitServe 0.2 has no public call for this: its own ``OpenAISpec.chat_completion`` does it inline
    (a buffer entry in ``response_buffer``, then a ``(queue id, uid, time, payload)`` tuple on the
    request queue), and that route cannot serve this API's contract (400s that name the field,
    checked on the raw body; ``finish_reason: "length"``; one id per stream; ``include_usage``;
    ``/predict`` on the same workers) — and never removes its buffer entries. So this function does
    what LitServe does, here only; ``tests/test_serve.py::test_the_litserve_internals_we_use_are_unchanged``
    fails loudly if an upgrade changes any of it, and pyproject.toml caps LitServe at the release
    it was tested on."""
    uid, q, event = uuid.uuid4(), deque(), asyncio.Event()
    # registered before the request is queued, so the reply cannot arrive first
    spec.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
    try:
        spec.request_queue.put((spec.response_queue_id, uid, time.monotonic(), payload))
        yield spec.data_streamer(q, event, send_status=True)
    finally:
        spec.response_buffer.pop(uid, None)


async def worker_messages(pipe) -> AsyncIterator[dict]:
    """One request's messages from the worker (see :meth:`SpellxferAPI.predict`). A failure is
    raised as this request's HTTPException: LitServe's own (a 504 timeout, a crashed batch), or a
    failure ``predict`` reported for this request alone (``{"error": …}``: the cause stays in the
    server log) as a 500."""
    async for data, status in pipe:
        if status == LitAPIStatus.ERROR:
            raise data if isinstance(data, HTTPException) else HTTPException(500, GENERATION_FAILED)
        message = json.loads(data)
        if message.get("error") is not None:
            raise HTTPException(500, GENERATION_FAILED)
        yield message


async def merged(streams) -> AsyncIterator[tuple[int, object]]:
    """``(index, item)`` from several async iterators, as the items arrive (the ``n`` choices of a
    streamed request, generated in the same or in different batches)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as e:  # raised where the items are read
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get())[1] is not done:
                if isinstance(item[1], Exception):
                    raise item[1]
                yield item
    finally:
        for task in tasks:
            task.cancel()


class SpellxferSpec(OpenAISpec):
    """LitServe's OpenAI spec, plus ``/predict`` on the same queue, with validation before enqueueing.

    The routes are this spec's own (see :func:`_queued` for why not LitServe's ``chat_completion``);
    the objects they return are LitServe's OpenAI models."""

    def __init__(self, limits: Limits):
        super().__init__()
        self.limits = limits

    def pre_setup(self, lit_api):
        super().pre_setup(lit_api)
        self.add_endpoint("/predict", self.predict_route, ["POST"])

    def populate_context(self, context, request):
        pass  # the LitAPI reads everything it needs from the request itself

    async def _parse(self, parser, request: Request):
        try:
            return parser(await request.body(), self.limits)
        except ApiError as e:
            if e.code == "thinking_not_allowed":
                # imported only after serve sets PROMETHEUS_MULTIPROC_DIR (see monitoring.py)
                from spellxfer.serving.monitoring import THINKING_REJECTED

                THINKING_REJECTED.inc()
            raise

    async def chat_completion(self, request: Request, background_tasks: BackgroundTasks):
        req = await self._parse(parse_chat, request)
        if req.stream:
            return StreamingResponse(self._stream(req), media_type="text/event-stream",
                                     background=background_tasks)
        return await self._complete(req)

    async def _final(self, payload) -> dict:
        """One request's last message (what it generated), the streamed steps before it skipped."""
        async with _queued(self, payload) as pipe:
            async for message in worker_messages(pipe):
                if "delta" not in message:
                    return message
        raise HTTPException(500, GENERATION_FAILED)  # the worker ended the stream without a reply

    async def _complete(self, req) -> ChatCompletionResponse:
        """The ``chat.completion`` object, each choice with its own ``finish_reason``."""
        outs = await asyncio.gather(*(self._final(req.model_copy(update={"n": 1})) for _ in range(req.n)))
        choices = [ChatCompletionResponseChoice(index=i,
                                                message=ChatMessage(role="assistant", content=o["content"]),
                                                finish_reason=o["finish_reason"])
                   for i, o in enumerate(outs)]
        usage = sum(UsageInfo(**o) for o in outs)
        return ChatCompletionResponse(model=req.model, choices=choices, usage=usage)

    async def _stream(self, req):
        """``chat.completion.chunk`` events, all with one ``id``, ``created`` and ``model``: the role
        at once, then each piece of text as the worker generates it (a step's new text, per
        choice), then each choice's ``finish_reason`` with any text held back until the reply was
        complete (a whitespace tail, the start of a ``stop`` sequence), then — with
        ``stream_options: {"include_usage": true}``, as OpenAI — a last chunk with the usage."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(i=None, usage=None, **choice) -> str:
            choices = [] if i is None else [ChatCompletionStreamingChoice(index=i, **choice)]
            c = ChatCompletionChunk(id=cid, created=created, model=req.model, choices=choices, usage=usage)
            return f"data: {c.model_dump_json(by_alias=True)}\n\n"

        sent, outs = [""] * req.n, [None] * req.n
        try:
            async with AsyncExitStack() as stack:
                pipes = [await stack.enter_async_context(_queued(self, req.model_copy(update={"n": 1})))
                         for _ in range(req.n)]
                for i in range(req.n):
                    yield chunk(i, delta=ChoiceDelta(role="assistant", content=""))
                async for i, message in merged([worker_messages(pipe) for pipe in pipes]):
                    if "delta" in message:
                        if message["delta"]:
                            sent[i] += message["delta"]
                            yield chunk(i, delta=ChoiceDelta(content=message["delta"]))
                        continue
                    outs[i], rest = message, _rest(message["content"], sent[i])
                    if rest:
                        yield chunk(i, delta=ChoiceDelta(content=rest))
                    yield chunk(i, delta=ChoiceDelta(), finish_reason=message["finish_reason"])
            if (req.stream_options or {}).get("include_usage"):
                yield chunk(usage=sum(UsageInfo(**o) for o in outs))
            yield "data: [DONE]\n\n"
        except HTTPException as e:  # headers are sent: the error goes in the stream, as OpenAI's
            body = {"error": {"message": str(e.detail), "type": "server_error" if e.status_code >= 500
                              else "invalid_request_error", "code": e.status_code}}
            yield f"data: {json.dumps(body)}\n\n"

    async def predict_route(self, request: Request):
        start = time.perf_counter()
        out = await self._final(await self._parse(parse_predict, request))
        latency_ms = round((time.perf_counter() - start) * 1e3, 2)
        return {"answer": out["answer"], "parsed": out["parsed"], "latency_ms": latency_ms}


def _rest(content: str, sent: str) -> str:
    """What a stream still owes of the finished reply ``content`` after sending ``sent``."""
    if content.startswith(sent):
        return content[len(sent) :]
    log.warning("a streamed reply changed after it was sent (a late </think>?): sent %r, reply %r",
                sent, content)
    return ""


class SpellxferAPI(ls.LitAPI):
    """Loads the model once per worker and answers batches of chat / predict requests."""

    def __init__(self, settings: ServingSettings, api_key: str | None = None):
        super().__init__(spec=SpellxferSpec(settings.limits), **settings.litserve_options()["lit_api"])
        self.settings = settings
        self.api_key = api_key

    def authorize(self, request: Request) -> None:
        """Bearer-token check for every route but ``/health`` (load balancers probe it without one)."""
        if self.api_key is None or request.url.path == "/health":
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        matches = secrets.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not matches:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "invalid_api_key")

    def setup(self, device):
        # torch loads here, in the inference workers only: the HTTP processes never need it
        from spellxfer.evaluation.evaluate import load_for_generation
        from spellxfer.models.generation import default_sampling
        from spellxfer.serving import monitoring  # after serve sets PROMETHEUS_MULTIPROC_DIR

        self.monitoring = monitoring
        self.model, self.tokenizer = load_for_generation(self.settings.model, self.settings.adapter, device)
        self.defaults = default_sampling()
        self.batches = 0

    def decode_request(self, request, **kwargs) -> Job:
        # LitServe decodes a whole batch in one try block: a request that cannot be decoded is
        # marked here and fails alone in predict, instead of taking its batch down.
        try:
            return self._job(request)
        except Exception as e:
            log.exception("decoding a request failed")
            return Job("failed", (), self.defaults, error=f"{type(e).__name__}: {e}")

    def _job(self, request) -> Job:
        if isinstance(request, PredictRequest):
            max_new = request.max_tokens or self.defaults.max_new_tokens
            sampling = replace(self.defaults, max_new_tokens=max_new)
            kind = answer_kind(request.question, request.task, request.answer_kind)
            return Job("predict", (("user", request.question),), sampling, kind)
        s = self.defaults
        max_tokens = request.max_completion_tokens or request.max_tokens  # parse_chat refused 0
        s = replace(s, max_new_tokens=max_tokens or s.max_new_tokens)
        if "temperature" in request.model_fields_set and request.temperature is not None:
            if request.temperature == 0:
                s = replace(s, decoding="greedy")
            else:
                s = replace(s, temperature=request.temperature)
        if "top_p" in request.model_fields_set and request.top_p is not None:
            s = replace(s, top_p=request.top_p)
        if request.min_p is not None:
            s = replace(s, min_p=request.min_p)
        if request.seed is not None:
            s = replace(s, seed=request.seed)
        messages = tuple((m.role, message_text(m.content, "content")) for m in request.messages)
        return Job("chat", messages, s, stop=request.stop_sequences(), seeded=request.seed is not None,
                   stream=bool(request.stream))

    def predict(self, x, **kwargs):
        """Replies to a batch of jobs (one job when ``max_batch_size`` is 1), as LitServe's
        streaming loops take them: each yield is one message per job (a list when batched).

        The last yield holds each job's reply (:meth:`_output`) or ``{"error": …}``. Before it,
        while a group with streamed jobs generates, every decode step that adds text to one of them
        yields ``{"delta": text}`` per job ("" for the others). Groups without streamed jobs are
        generated in this thread without any per-step work."""
        batched = self.max_batch_size > 1
        jobs: list[Job] = x if batched else [x]
        start = time.perf_counter()
        outputs: list[dict] = [{"error": job.error} for job in jobs]
        prompts: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            if job.error is None:
                try:  # tokenized one by one: content the tokenizer refuses fails its own request
                    conv = [{"role": r, "content": c} for r, c in job.messages]
                    prompts[i] = chat_token_ids(self.tokenizer, [conv])[0]
                except Exception as e:
                    log.exception("tokenizing a request failed")
                    outputs[i] = {"error": f"{type(e).__name__}: {e}"}
        groups: dict[object, list[int]] = defaultdict(list)
        for i in prompts:
            # one generate call per distinct sampling setting; a seeded request alone, so that
            # its reply depends on its seed and not on the requests it shares a batch with
            groups[(jobs[i].sampling, i if jobs[i].seeded else None)].append(i)
        for (sampling, _), idx in groups.items():
            group = [(jobs[i], prompts[i]) for i in idx]
            if any(job.stream for job, _ in group):
                results = yield from self._stream_group(sampling, group, idx, len(jobs), batched)
            else:
                results = self._generate_group(sampling, group)
            for i, result in zip(idx, results):
                outputs[i] = result
        served = [o for o in outputs if "error" not in o]
        self.monitoring.record_batch(len(jobs), time.perf_counter() - start,
                                     sum(o["prompt_tokens"] for o in served),
                                     sum(o["completion_tokens"] for o in served))
        yield outputs if batched else outputs[0]

    def _generate_group(self, sampling, group: list[tuple[Job, list[int]]]) -> list[dict]:
        try:
            return self._generate(sampling, group)
        except Exception:
            # Something in this group cannot be generated. Retry each request on its own, so
            # that only the culprit fails and its neighbours are still served.
            log.exception("a generation batch failed; retrying its %d requests one by one", len(group))
            return [self._generate_alone(sampling, item) for item in group]

    def _stream_group(self, sampling, group: list[tuple[Job, list[int]]], idx: list[int], size: int,
                      batched: bool):
        """Generate a group that holds streamed jobs, yielding each decode step's new text (see
        :meth:`predict`); returns the group's replies. ``idx``: the group's places among the
        batch's ``size`` jobs. Should the group fail, its jobs are retried one by one like any
        group's — except streamed ones that have sent text already: it cannot be recalled, so
        they fail."""
        replies = {k: StreamedReply(self.tokenizer, job.stop)
                   for k, (job, _) in enumerate(group) if job.stream}

        def messages(deltas: dict[int, str]):
            out = [{"delta": ""} for _ in range(size)]
            for k, delta in deltas.items():
                out[idx[k]]["delta"] = delta
            return out if batched else out[0]

        def generate(on_step):
            return self._generate(sampling, group, on_step)

        try:
            return (yield from streamed_steps(generate, replies, messages))
        except Exception:
            log.exception("a streamed generation batch failed; retrying its requests that have sent nothing")
            return [{"error": "failed after part of its reply was streamed"}
                    if k in replies and replies[k].sent
                    else self._generate_alone(sampling, item)
                    for k, item in enumerate(group)]

    def _generate_alone(self, sampling, item: tuple[Job, list[int]]) -> dict:
        try:
            return self._generate(sampling, [item])[0]
        except Exception as e:
            log.exception("generation failed for one request")
            return {"error": f"{type(e).__name__}: {e}"}

    def _generate(self, sampling, group: list[tuple[Job, list[int]]], on_step=None) -> list[dict]:
        """Replies (shaped by :meth:`_output`) to ``(job, prompt ids)`` that share one sampling
        setting; ``on_step`` is the engine's per-step hook (streaming)."""
        from spellxfer.models.generation import GenerationEngine  # torch: inference workers only

        self.batches += 1  # a new seed per batch: the same question can get different samples
        seed = sampling.seed if group[0][0].seeded else self.batches
        engine = GenerationEngine(self.model, self.tokenizer, replace(sampling, seed=seed),
                                  batch_size=len(group))
        engine.on_step = on_step
        replies = engine.generate_ids([prompt for _, prompt in group])
        return [self._output(job, reply[0], len(prompt), reply_ids[0], engine.stop_ids)
                for (job, prompt), reply, reply_ids in zip(group, replies, engine.last_reply_ids)]

    def _output(self, job: Job, reply: str, prompt_tokens: int, reply_ids: list[int], stop_ids) -> dict:
        """One reply as the routes return it. ``completion_tokens`` counts the generated ids (up
        to and including the end-of-turn token, or to the end of the first ``stop`` match);
        ``finish_reason`` is ``length`` when the reply hit max_tokens without ending."""
        ended = bool(reply_ids) and reply_ids[-1] in stop_ids
        if job.kind == "predict":
            answer = strip_end_of_turn(reply)
            parsed = parse_answer(answer, job.answer_kind)
            if parsed is not None and job.answer_kind == "integer":
                parsed = int(parsed)
            return {"answer": answer, "parsed": parsed, **_usage(prompt_tokens, len(reply_ids))}
        content, cut = chat_content(reply, job.stop)
        used = len(reply_ids)
        if cut:  # the tokens it took to write the content up to the stop sequence
            used = _tokens_spelling(token_pieces(self.tokenizer, reply_ids), len(content), used)
        return {"role": "assistant", "content": content,
                "finish_reason": "stop" if ended or cut else "length", **_usage(prompt_tokens, used)}

    def encode_response(self, output, **kwargs):
        # `output` streams what predict yielded: a list per batch (batched) or one dict.
        yield from output


def _tokens_spelling(pieces: list[str], chars: int, default: int) -> int:
    """How many generated tokens it took to write the reply's first ``chars`` visible characters
    (leading whitespace is not part of the reply); ``default`` when they never do."""
    text = ""
    for k, piece in enumerate(pieces):
        text += piece
        if len(text.lstrip()) >= chars:
            return k + 1
    return default


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_response(request: Request, exc: HTTPException) -> JSONResponse:
    """Every HTTP error as OpenAI's error object, so clients show the message."""
    status = exc.status_code
    codes = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
             422: "invalid_request", 504: "timeout"}
    server_side = status >= 500
    fallback = "server_error" if server_side else "invalid_request"
    code = getattr(exc, "code", None) or codes.get(status, fallback)
    body = {"error": {"message": str(exc.detail),
                      "type": "server_error" if server_side else "invalid_request_error",
                      "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))


def build_server(settings: ServingSettings, api_key: str | None = None) -> ls.LitServer:
    """The LitServer: our API, the metrics middleware and route, the API docs behind the same
    auth, OpenAI-shaped errors."""
    from spellxfer.serving import monitoring  # after serve sets PROMETHEUS_MULTIPROC_DIR

    api = SpellxferAPI(settings, api_key)
    # FastAPI's own /openapi.json, /docs and /redoc take no dependencies; with them off, the same
    # three are added below behind api.authorize (FastAPI's recipe for protected docs).
    server = ls.LitServer(api, middlewares=[monitoring.MetricsMiddleware],
                          **settings.litserve_options()["server"], disable_openapi_url=True,
                          model_metadata={"model": settings.model, "adapter": settings.adapter,
                                          "thinking": "disabled (Qwen3 non-thinking mode only)"})
    auth = [Depends(api.authorize)]

    async def metrics(request: Request) -> Response:
        body, content_type = monitoring.exposition()
        return Response(body, media_type=content_type)

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(server.app.openapi())

    async def docs(request: Request):
        return get_swagger_ui_html(openapi_url="/openapi.json", title="spellxfer API")

    async def redoc(request: Request):
        return get_redoc_html(openapi_url="/openapi.json", title="spellxfer API")

    created = int(time.time())

    def model_card() -> dict:
        """The one model this server serves, as an OpenAI ``Model`` object (``adapter``: ours)."""
        return {"id": settings.model, "object": "model", "created": created, "owned_by": "spellxfer",
                "adapter": settings.adapter}

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request, model_id: str) -> JSONResponse:
        if model_id != settings.model:
            raise HTTPException(404, f"model {model_id!r} is not served here; "
                                     f"this server serves {settings.model!r}")
        return JSONResponse(model_card())

    server.app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=auth)
    server.app.add_api_route("/v1/models", models, methods=["GET"], dependencies=auth)
    server.app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"], dependencies=auth)
    for path, endpoint in (("/openapi.json", openapi), ("/docs", docs), ("/redoc", redoc)):
        server.app.add_api_route(path, endpoint, methods=["GET"], dependencies=auth, include_in_schema=False)
    server.app.add_exception_handler(StarletteHTTPException, error_response)
    server.app.add_exception_handler(
        RequestValidationError, lambda r, e: error_response(r, HTTPException(422, str(e.errors()[0]["msg"])))
    )
    return server


def serve(
    model: str | None = None,
    adapter: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_file: str | None = None,
    max_batch_size: int | None = None,
    batch_timeout: float | None = None,
    workers_per_device: int | None = None,
    deploy_config: str = str(DEFAULT_CONFIG),
) -> int:
    """Serve a model over HTTP (LitServe): OpenAI chat completions, /predict, /health, /metrics.

    Qwen3 is served in non-thinking mode only: requests asking for thinking get a 400. Settings
    not given as flags come from the config's serving block. Listening beyond this machine
    (0.0.0.0 or ::) needs an API key; without one, serve refuses to start.

    Args:
        model: Model name (tiny-qwen3, smollm2-135m, Qwen/Qwen3-4B) or a directory (export's OUT/merged).
        adapter: PEFT adapter directory (export's OUT/adapter) applied on top of the model.
        host: Interface to listen on: 127.0.0.1 (default, this machine only), 0.0.0.0 or :: (need an API key).
        port: TCP port (1024-65535).
        api_key: Require 'Authorization: Bearer KEY' on every route but /health. Visible in ps:
            prefer $SPELLXFER_API_KEY or --api-key-file.
        api_key_file: File holding the API key (one line); default $SPELLXFER_API_KEY.
        max_batch_size: Requests generated together (LitAPI max_batch_size).
        batch_timeout: Seconds the first request of a batch waits for others (LitAPI batch_timeout).
        workers_per_device: Model copies per device (LitServer workers_per_device).
        deploy_config: Deployment config (configs/deployment/lightning_config.yaml) with the serving
            block and request limits.
    """
    # SIGTERM (docker stop, Lightning scale-down, test teardown) takes LitServer's graceful
    # Ctrl-C path: workers stop, and the `finally` below removes the metrics directory.
    main_pid = os.getpid()

    def _interrupt(signum, frame):
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # a forked HTTP server: die the default way
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, _interrupt)
    # prometheus_client picks single- or multi-process storage when it is first imported.
    own_prom_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if own_prom_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="spellxfer-metrics-")
    try:
        settings = _settings(load_config(deploy_config), deploy_config, model=model, adapter=adapter,
                             max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                             workers_per_device=workers_per_device)
        api_key = resolve_api_key(api_key, api_key_file)
        if host not in ("127.0.0.1", "0.0.0.0", "::"):
            raise SpellxferError(f"--host: LitServe listens on 127.0.0.1, 0.0.0.0 or ::, got {host!r}")
        if host not in LOOPBACK and api_key is None:
            raise SpellxferError(f"--host {host} listens beyond this machine and needs an API key: set "
                                 "$SPELLXFER_API_KEY or --api-key-file FILE (or use --host 127.0.0.1)")
        if not 1024 <= port <= 65535:
            raise SpellxferError(f"--port: must be in 1024-65535, got {port}")
        console = Console(stderr=True)
        server = build_server(settings, api_key)
        console.print(f"serving {settings.model}" + (f" + {settings.adapter}" if settings.adapter else "")
                      + f" on http://{host}:{port} "
                      "(non-thinking; /v1/chat/completions, /predict, /health, /metrics)")
        server.run(host=host, port=port, generate_client_file=False, log_level="warning",
                   **settings.litserve_options()["run"])
    finally:
        if own_prom_dir:
            shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)
    return 0


def _settings(cfg, config: str, **flags) -> ServingSettings:
    """The config's serving block with the flags that were given, validated together."""
    # registry imports torch, which only the inference workers need
    from spellxfer.models.registry import check_model_name

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        settings = ServingSettings.model_validate({**cfg.serving.model_dump(), **given})
    except ValidationError as e:
        raise SpellxferError(f"serve: {validation_message(e)} (flag or {config}: serving)") from None
    check_model_name(settings.model)
    if settings.adapter is not None and not (Path(settings.adapter) / "adapter_config.json").is_file():
        raise SpellxferError(f"--adapter {settings.adapter}: no adapter_config.json there "
                             "(expected export's OUT/adapter)")
    return settings
