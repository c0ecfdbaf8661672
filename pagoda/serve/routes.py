"""HTTP endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health, /ready, /metrics.

Each generation endpoint: resolve the model name (aliases), reject what is not supported, turn
the request into prompt token ids and `SamplingParams`, check the context window, submit one
engine request per choice (`ChoiceStreams`), then answer in one JSON body or as SSE chunks.
Admission errors (invalid values, context length, queue full) are raised before any byte of the
response is sent, so they keep their HTTP status even for `stream: true`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from pagoda.errors import ContextLengthError, InvalidRequestError, PagodaError
from pagoda.infer.sampling import SamplingParams
from pagoda.rag.answer import NOT_FOUND
from pagoda.serve.errors import NotSupportedError, error_body, pagoda_error_body, with_param
from pagoda.serve.generation import ChoiceEvent, ChoiceStreams
from pagoda.serve.grounding import citation_dicts, ground
from pagoda.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    _Sampling,
)
from pagoda.tokenizer import render_chat

T = TypeVar("T")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LEGACY_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


def build_router(state: Any) -> APIRouter:
    """The API routes of one app; `state` is its ServeState."""
    router = APIRouter()
    guard = [Depends(state.guard)]

    @router.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: the model is loaded and the engine runs."""
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": state.model_id})

    @router.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format."""
        stats = state.engine.stats if state.engine is not None else None
        return Response(state.metrics.render(stats), media_type=state.metrics.content_type)

    @router.get("/v1/models", dependencies=guard)
    async def list_models() -> dict[str, Any]:
        """The served model, then its aliases, then "BASE:ADAPTER" for each loaded adapter."""
        return {"object": "list", "data": [state.model_card(m) for m in
                                           [*state.listed_models, *state.adapter_models]]}

    @router.get("/v1/models/{model:path}", dependencies=guard)
    async def get_model(model: str) -> dict[str, Any]:
        """One model (or alias) by id."""
        state.resolve_model(model)
        return state.model_card(model)

    @router.post("/v1/chat/completions", dependencies=guard,
                 responses={200: {"model": ChatCompletion}, **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions (streamed with `stream: true`)."""
        return await _chat(state, body, request)

    @router.post("/v1/completions", dependencies=guard,
                 responses={200: {"model": Completion}, **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI legacy completions, with echo + logprobs for evaluation harnesses."""
        return await _complete(state, body, request)

    return router


# --------------------------------------------------------------------- shared
def _reject_unsupported(body: _Sampling) -> None:
    if body.logit_bias:
        raise with_param(NotSupportedError("logit_bias is not supported yet; remove it."),
                         "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise with_param(InvalidRequestError(
            "stream_options is only allowed when stream is true."), "stream_options")


def _params(body: _Sampling, max_tokens: int | None, logprobs: bool,
            top_logprobs: int) -> SamplingParams:
    """SamplingParams of one request (validated; the error names the field)."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed, max_tokens=max_tokens, stop=stop, ignore_eos=body.ignore_eos,
        logprobs=logprobs, top_logprobs=top_logprobs)
    try:
        params.validate()
    except InvalidRequestError as exc:
        field = re.match(r"\w*", str(exc)).group(0)
        raise with_param(exc, field if hasattr(params, field) else None) from None
    return params


def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies; seeded requests get seed, seed+1, ... so choices differ but reproduce."""
    if params.seed is None:
        return [params] * n
    return [replace(params, seed=params.seed + i) for i in range(n)]


def _check_context(state: Any, prompt_len: int, max_tokens: int | None, what: str) -> None:
    """Raise ContextLengthError (400) with the numbers when the request cannot fit."""
    context = state.context
    if prompt_len == 0:
        raise with_param(InvalidRequestError(f"The {what} is empty: give at least one token."),
                         what)
    if prompt_len >= context:
        raise with_param(ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, your {what} "
            f"resulted in {prompt_len} tokens. Please reduce the length of the {what}."), what)
    if max_tokens is not None and prompt_len + max_tokens > context:
        raise with_param(ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
            f"completion). Please reduce the length of the {what} or completion."), what)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (non-streaming requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.CancelledError("client disconnected")
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _note(request: Request, **fields: Any) -> None:
    """Add generation facts to this request's access-log entry."""
    request.state.generation = {**getattr(request.state, "generation", {}), **fields}


def _finish_note(request: Request, streams: ChoiceStreams, prompt_tokens: int) -> None:
    _note(request, prompt_tokens=prompt_tokens, completion_tokens=streams.completion_tokens,
          finish_reasons=[streams.finish_reasons.get(i) for i in range(len(streams.gens))],
          ttft_s=None if streams.first_token_s is None else round(streams.first_token_s, 4))


# ---------------------------------------------------------------------- chat
async def _chat(state: Any, body: ChatCompletionRequest, request: Request) -> Response:
    started = time.perf_counter()
    model = state.resolve_model(body.model)
    _reject_unsupported(body)
    constraint = None
    if body.response_format is not None:
        try:  # compiling a large schema takes a moment: keep it off the event loop
            constraint = await asyncio.to_thread(
                state.constraints.for_response_format,
                body.response_format.model_dump(exclude_none=True))
        except PagodaError as exc:
            raise with_param(exc, "response_format") from None
    tok = state.tokenizer
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    citations = None
    if body.knowledge_base is not None:
        grounding = await ground(state, body.knowledge_base, messages, request, body.rerank)
        if not grounding.citations:  # nothing relevant: say so without asking the model
            return _canned_chat(state, body, model, request, NOT_FOUND)
        messages, citations = grounding.messages, citation_dicts(grounding.citations)
    try:
        prompt_text = render_chat(tok, messages, tools=body.tools)
    except PagodaError as exc:
        raise with_param(exc, "messages") from None
    ids = tok.encode(prompt_text, add_special_tokens=False)
    max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens,
                                   state.settings.default_max_tokens) if m is not None), None)
    if max_tokens is not None and body.max_completion_tokens is None and body.max_tokens is None:
        max_tokens = min(max_tokens, max(1, state.context - len(ids)))  # a default must fit
    params = replace(
        _params(body, max_tokens, logprobs=bool(body.logprobs),
                top_logprobs=body.top_logprobs or 0), constraint=constraint)
    _check_context(state, len(ids), max_tokens, "messages")
    _note(request, model=model, **({"prompt": prompt_text} if state.settings.log_prompts else {}))
    state.metrics.prompt_tokens.inc(len(ids))

    rid = f"chatcmpl-{request.state.request_id}"
    created = int(time.time())
    streams = ChoiceStreams(state.engine, tok, state.metrics, started)
    await streams.start([ids] * body.n, _choice_params(params, body.n), rid,
                        state.adapter_of(model))
    want_logprobs = bool(body.logprobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _chat_stream(state, streams, request, rid, created, model, len(ids), body.n,
                           want_logprobs, include_usage, citations)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(streams.close))
    try:
        texts, logprobs = await _until_disconnect(
            request, _collect_chat(state, streams, body.n, want_logprobs))
    finally:
        await streams.close()
        _finish_note(request, streams, len(ids))
    choices = [{
        "index": i,
        "message": {"role": "assistant", "content": texts[i], "refusal": None},
        "logprobs": {"content": logprobs[i], "refusal": None} if want_logprobs else None,
        "finish_reason": streams.finish_reasons.get(i),
    } for i in range(body.n)]
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": _usage(len(ids), streams.completion_tokens),
        "system_fingerprint": state.fingerprint,
        **({"citations": citations} if citations is not None else {})})


def _canned_chat(state: Any, body: ChatCompletionRequest, model: str, request: Request,
                 text: str) -> Response:
    """A chat completion with a fixed answer and no model call (streamed if asked)."""
    rid, created = f"chatcmpl-{request.state.request_id}", int(time.time())
    head = {"id": rid, "created": created, "model": model,
            "system_fingerprint": state.fingerprint}
    if not body.stream:
        choices = [{"index": i, "message": {"role": "assistant", "content": text,
                                            "refusal": None},
                    "logprobs": None, "finish_reason": "stop"} for i in range(body.n)]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": _usage(0, 0), "citations": []})
    chunk = {**head, "object": "chat.completion.chunk"}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if include_usage:
        chunk["usage"] = None
    lines = []
    for i in range(body.n):
        for delta, finish in (({"role": "assistant", "content": ""}, None),
                              ({"content": text}, None), ({}, "stop")):
            extra = {"citations": []} if i == 0 and finish is None and "role" in delta else {}
            lines.append(_sse({**chunk, **extra, "choices": [
                {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}))
    if include_usage:
        lines.append(_sse({**chunk, "choices": [], "usage": _usage(0, 0)}))
    lines.append("data: [DONE]\n\n")
    return StreamingResponse(iter(lines), media_type="text/event-stream", headers=SSE_HEADERS)


async def _collect_chat(state: Any, streams: ChoiceStreams, n: int, want_logprobs: bool
                        ) -> tuple[list[str], list[list[dict[str, Any]]]]:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    async for ev in streams.events():
        texts[ev.index].append(ev.text)
        if want_logprobs and ev.token_id is not None and ev.logprob is not None:
            logprobs[ev.index].append(
                state.token_strings.chat_entry(ev.token_id, ev.logprob, ev.top_logprobs))
    return ["".join(t) for t in texts], logprobs


async def _chat_stream(state: Any, streams: ChoiceStreams, request: Request, rid: str,
                       created: int, model: str, prompt_tokens: int, n: int,
                       want_logprobs: bool, include_usage: bool,
                       citations: list[dict[str, Any]] | None = None) -> AsyncIterator[str]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": state.fingerprint}
    if include_usage:
        head["usage"] = None

    def chunk(index: int, delta: dict[str, Any], logprobs: list | None = None,
              finish: str | None = None, extra: dict[str, Any] | None = None) -> str:
        choice = {"index": index, "delta": delta,
                  "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
                  "finish_reason": finish}
        return _sse({**head, **(extra or {}), "choices": [choice]})

    async def chunks() -> AsyncIterator[str]:
        pending: list[list[dict[str, Any]]] = [[] for _ in range(n)]  # logprobs not yet sent
        for i in range(n):  # the passages, once, on the first chunk
            cited = {"citations": citations} if i == 0 and citations is not None else None
            yield chunk(i, {"role": "assistant", "content": ""}, extra=cited)
        async for ev in streams.events():
            if want_logprobs and ev.token_id is not None and ev.logprob is not None:
                pending[ev.index].append(
                    state.token_strings.chat_entry(ev.token_id, ev.logprob, ev.top_logprobs))
            if ev.text:
                yield chunk(ev.index, {"content": ev.text}, pending[ev.index])
                pending[ev.index] = []
            if ev.finish_reason is not None:
                yield chunk(ev.index, {}, pending[ev.index] or None, ev.finish_reason)

    async for line in _sse_body(chunks(), head, streams, request, prompt_tokens, include_usage):
        yield line


async def _sse_body(chunks: AsyncIterator[str], head: dict[str, Any], streams: ChoiceStreams,
                    request: Request, prompt_tokens: int,
                    include_usage: bool) -> AsyncIterator[str]:
    """An SSE response: the chunks, a usage chunk if asked, `[DONE]`; a failure after the
    response started becomes an error event; the engine requests are always closed."""
    try:
        async for line in chunks:
            yield line
        if include_usage:
            yield _sse({**head, "choices": [],
                        "usage": _usage(prompt_tokens, streams.completion_tokens)})
    except PagodaError as exc:
        yield _sse(pagoda_error_body(exc))
    except Exception as exc:  # engine failure after the response started: tell the client
        yield _sse(error_body(f"generation failed: {type(exc).__name__}: {exc}",
                              "server_error", None, "internal_error"))
    finally:
        await streams.close()
        _finish_note(request, streams, prompt_tokens)
    yield "data: [DONE]\n\n"


# --------------------------------------------------------------- completions
def _prompts(state: Any, body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) of every prompt; token-id prompts are used as given."""
    p = body.prompt
    if isinstance(p, str):
        items: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]  # type: ignore[list-item]
    else:
        items = list(p)  # type: ignore[arg-type]
    if not items:
        raise with_param(InvalidRequestError("prompt must not be an empty list."), "prompt")
    vocab = state.vocab_size
    out: list[tuple[str | None, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            out.append((item, state.tokenizer.encode(item, add_special_tokens=True)))
        else:
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise with_param(InvalidRequestError(
                    f"prompt has token id {bad}, outside this model's vocabulary [0, {vocab})."),
                    "prompt")
            out.append((None, list(item)))
    return out


async def _complete(state: Any, body: CompletionRequest, request: Request) -> Response:
    started = time.perf_counter()
    model = state.resolve_model(body.model)
    _reject_unsupported(body)
    if body.suffix:
        raise with_param(NotSupportedError("suffix is not supported; remove it."), "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise with_param(NotSupportedError("best_of is not supported (only best_of = n)."),
                         "best_of")
    if state.adapter_of(model) is not None and body.echo and body.logprobs is not None:
        raise with_param(NotSupportedError(
            "prompt logprobs (echo with logprobs) are scored by the base model only; request "
            "them without an adapter."), "model")
    prompts = _prompts(state, body)
    max_tokens = LEGACY_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    want_logprobs = body.logprobs is not None
    top_n = body.logprobs or 0
    # max_tokens = 0 (scoring only) is valid here; the engine needs >= 1
    params = _params(body, max(max_tokens, 1), logprobs=want_logprobs, top_logprobs=top_n)
    if max_tokens == 0 and body.stream:
        raise with_param(InvalidRequestError("max_tokens=0 cannot be streamed."), "max_tokens")
    for _, ids in prompts:
        _check_context(state, len(ids), max_tokens, "prompt")
    prompt_tokens = sum(len(ids) for _, ids in prompts)
    _note(request, model=model, **({"prompt": [t if t is not None else ids for t, ids in prompts]}
                                   if state.settings.log_prompts else {}))
    state.metrics.prompt_tokens.inc(prompt_tokens)

    rid = f"cmpl-{request.state.request_id}"
    created = int(time.time())
    n = body.n
    # choice index = prompt index * n + i, as OpenAI numbers them
    echo_texts = [(text if text is not None else state.tokenizer.decode(ids)) if body.echo
                  else "" for text, ids in prompts]
    streams = ChoiceStreams(state.engine, state.tokenizer, state.metrics, started)
    if max_tokens > 0:
        all_ids = [ids for _, ids in prompts for _ in range(n)]
        all_params = [p for _ in prompts for p in _choice_params(params, n)]
        await streams.start(all_ids, all_params, rid, state.adapter_of(model))
    if body.stream:
        gen = _complete_stream(state, streams, request, rid, created, model, prompts, n,
                               echo_texts, want_logprobs,
                               bool(body.stream_options and body.stream_options.include_usage))
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(streams.close))
    try:
        result = await _until_disconnect(request, _collect_completion(
            state, streams, prompts, n, body.echo, want_logprobs, top_n, max_tokens,
            echo_texts))
    finally:
        await streams.close()
        _finish_note(request, streams, prompt_tokens)
    return JSONResponse({
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": result, "usage": _usage(prompt_tokens, streams.completion_tokens),
        "system_fingerprint": state.fingerprint})


async def _collect_completion(state: Any, streams: ChoiceStreams,
                              prompts: list[tuple[str | None, list[int]]], n: int, echo: bool,
                              want_logprobs: bool, top_n: int, max_tokens: int,
                              echo_texts: list[str]) -> list[dict[str, Any]]:
    strings = state.token_strings
    total = len(prompts) * n
    texts: list[list[str]] = [[] for _ in range(total)]
    gen_tokens: list[list[ChoiceEvent]] = [[] for _ in range(total)]
    scored: list[Any] = [None] * len(prompts)
    score_task = None
    if echo and want_logprobs:  # the prompt's own logprobs: prefill-only path beside the engine
        score_task = asyncio.gather(*(state.scorer.score(ids, top_n) for _, ids in prompts))
    try:
        if max_tokens > 0:
            async for ev in streams.events():
                texts[ev.index].append(ev.text)
                if ev.token_id is not None:
                    gen_tokens[ev.index].append(ev)
        if score_task is not None:
            scored = await score_task
    finally:
        if score_task is not None and not score_task.done():
            score_task.cancel()
    choices = []
    for c in range(total):
        p = c // n
        text = echo_texts[p] + "".join(texts[c])
        finish = streams.finish_reasons.get(c, "length") if max_tokens > 0 else "length"
        logprobs = None
        if want_logprobs:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = 0
            if echo:
                lps, tops = scored[p]
                for t, lp, top in zip(prompts[p][1], lps, tops, strict=True):
                    _legacy_entry(logprobs, strings, t, lp, top if lp is not None else None,
                                  offset)
                    offset += len(strings.text(t))
                offset = len(echo_texts[p])
            for ev in gen_tokens[c]:
                _legacy_entry(logprobs, strings, ev.token_id, ev.logprob, ev.top_logprobs,
                              offset)
                offset += len(strings.text(ev.token_id))
        choices.append({"index": c, "text": text, "logprobs": logprobs, "finish_reason": finish})
    return choices


def _legacy_entry(logprobs: dict[str, list], strings: Any, token_id: int, lp: float | None,
                  top: list[tuple[int, float]] | None, offset: int) -> None:
    logprobs["tokens"].append(strings.text(token_id))
    logprobs["token_logprobs"].append(lp)
    logprobs["top_logprobs"].append(None if top is None else strings.top_dict(top))
    logprobs["text_offset"].append(offset)


async def _complete_stream(state: Any, streams: ChoiceStreams, request: Request, rid: str,
                           created: int, model: str, prompts: list, n: int,
                           echo_texts: list[str], want_logprobs: bool,
                           include_usage: bool) -> AsyncIterator[str]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": state.fingerprint}
    strings = state.token_strings
    prompt_tokens = sum(len(ids) for _, ids in prompts)

    def chunk(index: int, text: str, events: list[ChoiceEvent], finish: str | None) -> str:
        logprobs = None
        if want_logprobs:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for ev in events:
                _legacy_entry(logprobs, strings, ev.token_id, ev.logprob, ev.top_logprobs, 0)
        return _sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish}]})

    async def chunks() -> AsyncIterator[str]:
        pending: dict[int, list[ChoiceEvent]] = {}
        for c in range(len(prompts) * n):
            if echo_texts[c // n]:
                yield chunk(c, echo_texts[c // n], [], None)
        async for ev in streams.events():
            if ev.token_id is not None:
                pending.setdefault(ev.index, []).append(ev)
            if ev.text or ev.finish_reason is not None:
                yield chunk(ev.index, ev.text, pending.pop(ev.index, []), ev.finish_reason)

    async for line in _sse_body(chunks(), head, streams, request, prompt_tokens, include_usage):
        yield line
