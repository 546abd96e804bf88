"""The OpenAI-compatible HTTP API in front of the coordinator (FastAPI on uvicorn with uvloop).

    POST /v1/completions        prompt (text or token ids) -> text; stream: true for server-sent events
    POST /v1/chat/completions   messages, rendered with the target GGUF's chat template
    GET  /v1/models, /health, /metrics (Prometheus)

Extensions beside OpenAI's fields: top_k, min_p, ignore_eos (as vLLM names them), and the per-request
speculation policy `k` ("auto", 0 for the target alone, or a fixed draft length) and `mode`
("sequential" or "pipelined"). Every response carries `usage` and a `speculation` object with the
request's measured and predicted figures. Errors use OpenAI's body: {"error": {"message", "type",
"param", "code"}}; invalid requests are 400s, a failing target node a 503 (or an error event mid-stream).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from coordinator.loop import Coordinator, RequestError, Result, TargetError
from coordinator.loop import Request as GenRequest
from tandem.sampling import SamplingParams

log = logging.getLogger("tandem.coordinator.http")

MAX_STOP = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --- request bodies ---------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    k: int | Literal["auto"] | None = None
    mode: Literal["sequential", "pipelined"] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        return v

    @field_validator("k")
    @classmethod
    def _k(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 0:
            raise ValueError("k must be 'auto' or an integer >= 0")
        return v

    def unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "only n = 1 is supported", "n")
        if self.presence_penalty or self.frequency_penalty:
            raise APIError(400, "presence and frequency penalties are not supported", "presence_penalty")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")

    def params(self) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=max(self.top_k or 0, 0),
                top_p=1.0 if self.top_p is None else self.top_p,
                min_p=self.min_p or 0.0,
                seed=self.seed,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")
        if self.logprobs is not None:
            raise APIError(400, "logprobs are not supported", "logprobs")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", "best_of")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name:
            out["name"] = self.name
        return out


class ChatBody(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only the text response_format is supported", "response_format")


# --- the app ----------------------------------------------------------------------------------


def create_app(coord: Coordinator, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="Tandem coordinator", description=__doc__.split("\n\n")[0], version="0.1.0")
    tok = coord.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}" for e in errs
        )
        return JSONResponse(error_body(msg or "invalid request", param=loc[0] if loc else None), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse(error_body("invalid API key", "authentication_error"), status_code=401)
        return await call_next(request)

    def build(body: Sampling, prompt: list[int], max_tokens: int | None) -> GenRequest:
        body.unsupported()
        req = GenRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=body.params(),
            stop=body.stops(),
            k=None if body.k in (None, "auto") else int(body.k),
            mode=body.mode,
            ignore_eos=body.ignore_eos,
        )
        try:
            coord.check(req)
        except RequestError as exc:
            raise APIError(400, str(exc), exc.param) from None
        return req

    def usage(result: Result) -> dict[str, int]:
        p, c = result.stats.prompt_tokens, len(result.tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def run(req: GenRequest) -> Result:
        try:
            return await coord.run(req)
        except TargetError as exc:
            raise APIError(503, str(exc), kind="server_error") from None

    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def events(req: GenRequest, body: Sampling, make: Any, opening: bool) -> AsyncIterator[str]:
        """make(text, finish_reason, first) -> chunk dict; usage and stats close the stream."""
        result = Result()
        try:
            if opening:  # chat streams open with the assistant's role
                yield sse(make(None, None, True))
            async with aclosing(coord.stream(req, result)) as pieces:
                async for piece in pieces:
                    yield sse(make(piece, None, False))
        except TargetError as exc:
            yield sse(error_body(str(exc), "server_error"))
            return
        except RequestError as exc:
            yield sse(error_body(str(exc), param=exc.param))
            return
        final = make("", result.finish_reason, False)
        final["speculation"] = result.stats.as_dict()
        yield sse(final)
        if body.stream_options is not None and body.stream_options.include_usage:
            last = make("", None, False)
            last["choices"], last["usage"] = [], usage(result)
            yield sse(last)
        yield "data: [DONE]\n\n"

    def streaming(gen: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (batches are not supported)", "prompt")
            prompt = prompt[0]
        ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        req = build(body, ids, body.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": created, "model": coord.model_name,
                    "choices": [choice]}  # fmt: skip

        if body.stream:
            return streaming(events(req, body, chunk, opening=False))
        result = await run(req)
        out = chunk(result.text, result.finish_reason, False)
        out.update(usage=usage(result), speculation=result.stats.as_dict())
        return out

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Any:
        try:
            text = tok.apply_chat_template([m.as_template_input() for m in body.messages], add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        ids = tok.encode(text)
        if tok.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
            ids = ids[1:]  # the template wrote BOS already
        req = build(body, ids, body.max_completion_tokens or body.max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": coord.model_name,
                    "choices": [choice]}  # fmt: skip

        if body.stream:
            return streaming(events(req, body, chunk, opening=True))
        result = await run(req)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": coord.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result),
            "speculation": result.stats.as_dict(),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = coord.target.info
        assert info is not None
        entry = {"id": coord.model_name, "object": "model", "created": 0, "owned_by": "tandem",
                 "context_length": info.context_length}  # fmt: skip
        if coord.draft is not None and coord.draft.info is not None:
            entry["draft"] = coord.draft.info.model
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health() -> JSONResponse:
        target_ok = True
        try:
            await coord.target.call("ping", limit=2.0)
        except Exception as exc:  # any failure means "not serving", which is what /health reports
            target_ok = False
            target_error = str(exc)
        draft = coord.draft
        body: dict[str, Any] = {
            "status": "ok" if target_ok and (draft is None or draft.up) else ("degraded" if target_ok else "down"),
            "target": {"url": coord.target.url, "model": coord.model_name, "up": target_ok},
        }
        if not target_ok:
            body["target"]["error"] = target_error
        if draft is not None:
            body["draft"] = {"url": draft.url, "model": draft.info.model if draft.info else None, "up": draft.up}
            if not draft.up:
                body["draft"]["error"] = draft.down_reason
        body["tuner"] = {k: (None if v != v else round(v, 6)) for k, v in coord.tuner.summary().items()}
        return JSONResponse(body, status_code=200 if target_ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        coord.metrics.acceptance.set(coord.tuner.global_alpha())
        return Response(generate_latest(coord.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def serve(
    coord: Coordinator,
    host: str,
    port: int,
    api_key: str | None = None,
    log_level: str = "info",
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve on the running event loop (the coordinator's links live on it) until SIGINT/SIGTERM. ready is
    called once the socket listens: a client that acts on it (a log line) must not meet a refused connection."""
    import uvicorn

    config = uvicorn.Config(
        create_app(coord, api_key), host=host, port=port, loop="uvloop", log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started and ready is not None:
        ready()
    await task
