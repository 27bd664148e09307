"""OpenAI-compatible API: GET /v1/models, POST /v1/completions and /v1/chat/completions (server-sent events
when streaming, `n` parallel samples, stop strings, logprobs, usage, seed).

Owns the translation between OpenAI's request and response shapes and kernel processes, and the life of a
request's processes (`Job`): spawned for the request, followed, and killed the moment its client goes away.
Never samples or schedules (the kernel does) and never loads models itself (`ServerState.engine_for` does).

finish_reason: the kernel's "stop" and "length" pass through; a process that ended any other way (killed
through the native API, hibernated, aborted after an engine failure) reports "abort", as vLLM does.
Refused with a 400 that says so: presence/frequency penalties other than 0, logit_bias, suffix, best_of other
than n, echo with logprobs (no prompt logprobs), tools, a non-text response_format or content part. A 400 that
names the field: a message whose role is not system, developer, user, assistant or tool, or whose content is not
a string or a list of text parts; true/false where a number belongs.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmos.kernel.kernel import Kernel
from llmos.model.sampling import SamplingParams
from llmos.model.tokenizer import Tokenizer
from llmos.server.app import ApiError, Principal, ServerState, TokenRate, principal
from llmos.server.engine import Update
from llmos.server.models import Resident

router = APIRouter()

POLL_S = 0.25  # seconds between client-disconnect checks while a request waits for output
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's max_tokens default for /v1/completions
CLIENT_CLOSED = 499  # status of a response nobody reads any more (nginx's "client closed request")


# ---- a request's processes ---------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed the connection while its request was running."""


def api_finish_reason(reason: str | None) -> str | None:
    """The kernel's finish reason as OpenAI (and Ollama) clients know it: "stop", "length" or "abort"."""
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "abort"


@dataclass
class Job:
    """One request's processes on one model: a parent per prompt, each with `n - 1` children that the kernel
    forks from it when its prompt is computed (parallel sampling, copy-on-write). Choice `i * n + j` is
    prompt i's sample j: j = 0 the parent, then its children in pid order."""

    resident: Resident
    owner: str
    prompts: list[list[int]]
    parents: list[int]
    n: int
    seen_tokens: int = 0  # output tokens delivered through `updates`
    closed: bool = False

    @property
    def kernel(self) -> Kernel:
        return self.resident.kernel

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)

    def pids(self) -> list[int]:
        """Every process of the job so far (children exist once their parent's prompt is computed)."""
        with self.kernel.lock:
            return [q for pid in self.parents for q in (pid, *sorted(self.kernel.children(pid))[:self.n - 1])]

    def kill(self) -> None:
        """Kill the job's live processes, children included; their KV blocks are free when this returns.
        Killing a parent before its children are forked cancels the fork."""
        kernel, killed = self.kernel, []
        with kernel.lock:
            for pid in self.pids():
                p = kernel.processes.get(pid)
                if p is not None and not p.is_finished:
                    kernel.kill(pid)
                    killed.append(pid)
        for pid in killed:
            self.resident.engine.notify(pid)

    def completion_tokens(self) -> int:
        """Output tokens of all the job's processes (at least those delivered)."""
        with self.kernel.lock:
            counted = sum(p.num_output_tokens for pid in self.pids() if (p := self.kernel.processes.get(pid)))
        return max(counted, self.seen_tokens)

    def close(self, rate: TokenRate) -> None:
        """End of the request, however it ended: kill what still runs and charge the owner's token rate
        with the prompt and completion tokens. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.kill()
        rate.charge(self.owner, self.prompt_tokens + self.completion_tokens())

    async def updates(self, disconnected: Callable[[], Awaitable[bool]] | None = None
                      ) -> AsyncIterator[tuple[int, Update]]:
        """Every process's `Update`s as (choice index, update), in arrival order, until all have ended.

        `disconnected` (e.g. `request.is_disconnected`) is polled after each update and every POLL_S seconds
        while none comes; when it returns True this raises `ClientGone` (the caller then closes the job)."""
        engine, queue, tasks = self.resident.engine, asyncio.Queue(), []

        def follow(pid: int, index: int, parent: bool) -> None:
            async def run() -> None:
                first = parent
                try:
                    async for u in engine.follow(pid):
                        if first:  # the prompt is computed: the children exist (or were cancelled by a kill)
                            first = False
                            with self.kernel.lock:
                                kids = sorted(self.kernel.children(pid))[:self.n - 1]
                            for j, child in enumerate(kids, 1):
                                follow(child, index + j, False)
                            for j in range(len(kids) + 1, self.n):
                                queue.put_nowait((index + j, Update(finished=True, finish_reason="killed")))
                        queue.put_nowait((index, u))
                except Exception as err:  # handed to the consumer, which raises it
                    queue.put_nowait((index, err))

            tasks.append(asyncio.create_task(run()))

        for i, pid in enumerate(self.parents):
            follow(pid, i * self.n, True)
        remaining = len(self.parents) * self.n
        try:
            while remaining:
                try:
                    index, u = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    if disconnected is not None and await disconnected():
                        raise ClientGone() from None
                    continue
                if isinstance(u, Exception):
                    raise u
                remaining -= u.finished
                self.seen_tokens += len(u.token_ids)
                yield index, u
                if remaining and disconnected is not None and await disconnected():
                    raise ClientGone()
        finally:
            for t in tasks:
                t.cancel()

    def stats(self, index: int = 0) -> dict:
        """Timings of choice `index`'s process (monotonic seconds; None when unknown or reaped)."""
        pids = self.pids()
        p = self.kernel.processes.get(pids[index]) if index < len(pids) else None
        if p is None:
            return {"arrival": None, "first_token": None, "finish": None}
        return {"arrival": p.arrival_time, "first_token": p.first_token_time, "finish": p.finish_time}


MAX_CHOICES = 128  # processes one request may start (prompts x n): a small body must not occupy the engine for long


def spawn_job(resident: Resident, owner: str, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> Job:
    """Spawn one process per prompt (each with `n` samples) for `owner` and wake the engine. All or nothing:
    when one spawn fails the others are killed and the kernel's error (`InvalidRequestError`,
    `OutOfBlocksError`, `QuotaExceededError`) propagates. A 503 ApiError when the model was unloaded meanwhile."""
    kernel = resident.kernel
    job = Job(resident, owner, prompts, [], n)
    with kernel.lock:
        try:
            for ids in prompts:
                job.parents.append(kernel.spawn(ids, params, owner, n=n).pid)
        except BaseException:
            job.kill()
            raise
    if not resident.engine.running:
        job.kill()
        raise ApiError(503, "model_unloaded", f"model {resident.name!r} was unloaded while the request started; "
                       "send it again.")
    resident.engine.wake()
    return job


class ProcessStream(StreamingResponse):
    """A StreamingResponse that runs `on_close()` however the response ends: completed, client gone (the
    body generator is cancelled), or never iterated at all."""

    def __init__(self, content, on_close: Callable[[], None], **kw) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# ---- request bodies ----------------------------------------------------------------------------------


def not_bool(value):
    """Refuse a JSON boolean where a number belongs (pydantic would read true as 1 and false as 0)."""
    if isinstance(value, bool):
        raise PydanticCustomError("bool_not_number", "must be a number, not a boolean ({value})",
                                  {"value": json.dumps(value)})
    return value


def no_bool_token_ids(value):
    """Refuse JSON booleans among token ids (a list of ints, or of lists of ints)."""
    if isinstance(value, list) and any(isinstance(x, bool) or (isinstance(x, list) and any(
            isinstance(y, bool) for y in x)) for x in value):
        raise PydanticCustomError("bool_not_number", "token ids must be numbers, not a boolean (true or false)")
    return value


Int = Annotated[int, BeforeValidator(not_bool)]  # an int field that refuses true/false
Float = Annotated[float, BeforeValidator(not_bool)]  # a float field that refuses true/false


def message_object(value):
    """Refuse a chat message that is not a JSON object."""
    if not isinstance(value, dict):
        raise PydanticCustomError("chat_message", 'must be an object with a role and content, e.g. {"role": '
                                  '"user", "content": "Hello"}')
    return value


def chat_role(value, roles: tuple[str, ...]):
    """Refuse a missing role or one not in `roles`."""
    if value is None:
        raise PydanticCustomError("chat_role", "required: one of {roles}", {"roles": ", ".join(roles)})
    if value not in roles:
        raise PydanticCustomError("chat_role", "must be one of {roles}, not {value}",
                                  {"roles": ", ".join(roles), "value": json.dumps(value)})
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="a name from GET /v1/models")
    n: Int = Field(1, ge=1, le=64, description="samples per prompt, forked from one process after its prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="strings that end the output (not included in it)")
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: Float | None = Field(None, ge=0, le=1, description="nucleus sampling; 0 = greedy; default 1")
    seed: Int | None = None
    presence_penalty: Float | None = Field(None, description="only 0 is supported")
    frequency_penalty: Float | None = Field(None, description="only 0 is supported")
    logit_bias: dict[str, Float] | None = Field(None, description="not supported (must be empty)")
    user: str | None = Field(None, description="ignored: the caller is the API key's user")

    def check_supported(self) -> None:
        """A 400 ApiError for what llmos does not support."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, "invalid_request_error", f"{name} is not supported by llmos; leave it out "
                               "or set it to 0.")
        if self.logit_bias:
            raise ApiError(400, "invalid_request_error", "logit_bias is not supported by llmos; leave it out.")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The kernel's parameters (validated: an InvalidRequestError, a 400, names a bad one)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0:  # the smallest set with probability >= 0 is the most likely token
            temperature, top_p = 0.0, 1.0
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=self.seed,
                              stop=tuple(stop), logprobs=logprobs).validate()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt`: text, token ids, or a list of either (one choice group per prompt)."""

    prompt: Annotated[str | list[int] | list[str] | list[list[int]], BeforeValidator(no_bool_token_ids)]
    echo: bool = Field(False, description="prepend the prompt to each choice's text")
    logprobs: Int | None = Field(None, ge=0, le=5, description="log probabilities of each token and this many "
                                 "alternatives")
    suffix: str | None = Field(None, description="not supported")
    best_of: Int | None = Field(None, description="only best_of = n is supported")


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_PARTS = 'a string or a list of text parts {"type": "text", "text": "..."}'


class ChatMessage(BaseModel):
    """One message: `role` one of CHAT_ROLES; `content` a string, or text parts (joined) as in
    {"type": "text", "text": "..."}; other parts (images, audio) are a 400 that says llmos takes text only."""

    model_config = ConfigDict(extra="ignore")
    role: str = Field(None, validate_default=True)
    content: str = Field(None, validate_default=True)
    name: str | None = None

    _object = model_validator(mode="before")(message_object)
    _role = field_validator("role", mode="before")(lambda value: chat_role(value, CHAT_ROLES))

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value):
        if isinstance(value, str):
            return value
        if value is None:
            raise PydanticCustomError("chat_content", "required: {allowed}", {"allowed": TEXT_PARTS})
        if isinstance(value, list) and all(isinstance(part, dict) for part in value):
            if any(part.get("type") != "text" for part in value):
                raise PydanticCustomError("chat_content", "only text content parts are supported by llmos; send "
                                          "{allowed}", {"allowed": TEXT_PARTS})
            if all(isinstance(part.get("text"), str) for part in value):
                return "".join(part["text"] for part in value)
        raise PydanticCustomError("chat_content", "must be {allowed}", {"allowed": TEXT_PARTS})

    def for_template(self) -> dict:
        """{"role", "content"} for the chat template; "developer" is a system message."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. The messages go through the model's chat template (models without one get
    llmos' plain "Role: content" template)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1, description="overrides max_tokens")
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20, description="alternatives per token (needs logprobs)")
    tools: list | None = Field(None, description="not supported (must be empty)")
    response_format: dict | None = Field(None, description="only {'type': 'text'} is supported")


# ---- prompts and logprobs ------------------------------------------------------------------------------


def completion_prompts(prompt, tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of each prompt of a completion request (text is encoded as the kernel would)."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise ApiError(400, "invalid_request_error", "prompt is empty; give text or token ids.")
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return [tokenizer.encode(x) if isinstance(x, str) else list(x) for x in prompt]


def chat_prompt(messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template with the assistant's turn opened. A real
    template writes its own special tokens (so none are added, as transformers does); the plain fallback
    is encoded like a completion prompt."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=not tokenizer.has_chat_template)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class TokenText:
    """Token id -> its text (decoded alone, special tokens shown) and UTF-8 bytes, memoized. A token holding
    part of a multi-byte character decodes to U+FFFD, so its `bytes` are those of U+FFFD."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self._cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self._cache:
            self._cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._cache[token]

    def entry(self, token: int, logprob: float) -> dict:
        text = self(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


class LegacyLogprobs:
    """/v1/completions' `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset) for one choice,
    built a few tokens at a time; `text_offset` counts characters from the start of the choice's text
    (after the echoed prompt when echo is on). `top_logprobs` holds the alternatives plus the sampled
    token (so up to logprobs + 1 entries, as OpenAI documents); tokens whose texts are equal share one key."""

    def __init__(self, tokens: TokenText, offset: int = 0) -> None:
        self.tokens, self.offset = tokens, offset

    def add(self, token_ids: list[int], logprobs: list) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, (lp, top) in zip(token_ids, logprobs):
            text = self.tokens(token)
            alternatives = {}
            for t, v in [*top, (token, lp)]:  # tokens with the same text (e.g. U+FFFD) keep the likeliest
                alternatives.setdefault(self.tokens(t), _finite(v))
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(lp))
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def chat_logprobs(tokens: TokenText, token_ids: list[int], logprobs: list) -> dict:
    """/v1/chat/completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{**tokens.entry(token, lp), "top_logprobs": [tokens.entry(t, v) for t, v in top]}
                        for token, (lp, top) in zip(token_ids, logprobs)]}


# ---- responses -----------------------------------------------------------------------------------------


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


async def collect(job: Job, request: Request) -> list[Choice]:
    """Wait for every choice of `job` to end (raises ClientGone if the client leaves first)."""
    choices = [Choice() for _ in range(len(job.parents) * job.n)]
    async for i, u in job.updates(request.is_disconnected):
        c = choices[i]
        c.text += u.text
        c.token_ids += u.token_ids
        c.logprobs += u.logprobs
        if u.finished:
            c.finish_reason = api_finish_reason(u.finish_reason)
    return choices


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def collect_all(job: Job, request: Request, state: ServerState) -> list | None:
    """A non-streaming request's choices when its processes end (None when the client went away first: they
    are killed); the job is closed (tokens charged) either way."""
    try:
        return await collect(job, request)
    except ClientGone:
        return None
    finally:
        job.close(state.rate)


async def _start(request: Request, p: Principal, body: _Sampling, prompts_of, max_tokens_of, logprobs: int | None
                 ) -> tuple[ServerState, Job, Tokenizer]:
    """Quota check, model, prompts, spawn: the common start of both generation endpoints."""
    state: ServerState = request.app.state.llmos
    body.check_supported()
    state.rate.check(p)
    resident = await asyncio.to_thread(state.engine_for, body.model, p)
    tokenizer = resident.kernel.tokenizer
    prompts = await asyncio.to_thread(prompts_of, tokenizer)
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(400, "invalid_request_error", f"{len(prompts)} prompts x n={body.n} would start "
                       f"{len(prompts) * body.n} processes; one request may start at most {MAX_CHOICES}.")
    longest = max(len(ids) for ids in prompts)
    params = body.sampling_params(max_tokens_of(resident.kernel.context_length - longest), logprobs)
    return state, spawn_job(resident, p.name, prompts, params, body.n), tokenizer


# ---- endpoints -------------------------------------------------------------------------------------------


def model_card(name: str, path) -> dict:
    try:
        created = int(path.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": name, "object": "model", "created": created, "owned_by": "llmos"}


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request, p: Principal = Depends(principal)) -> dict:
    """Every model a request may name (loaded or not)."""
    models = await asyncio.to_thread(request.app.state.llmos.models.available)
    return {"object": "list", "data": [model_card(name, path) for name, path in sorted(models.items())]}


@router.get("/v1/models/{model}", tags=["openai"])
async def retrieve_model(model: str, request: Request, p: Principal = Depends(principal)) -> dict:
    """One model by name; 404 when there is none."""
    path = await asyncio.to_thread(request.app.state.llmos.models.path_of, model)
    return model_card(model, path)


@router.post("/v1/completions", tags=["openai"])
async def completions(body: CompletionRequest, request: Request, p: Principal = Depends(principal)):
    """Text completion of one or more prompts (`n` samples each), streamed as server-sent events when
    `stream` is set. A client that disconnects has its processes killed at once."""
    if body.suffix:
        raise ApiError(400, "invalid_request_error", "suffix is not supported by llmos; leave it out.")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "invalid_request_error", "best_of is not supported by llmos; leave it out "
                       "(or equal to n).")
    if body.echo and body.logprobs is not None:
        raise ApiError(400, "invalid_request_error", "echo with logprobs is not supported (llmos does not "
                       "compute prompt logprobs); drop one of them.")
    state, job, tokenizer = await _start(request, p, body, lambda tok: completion_prompts(body.prompt, tok),
                                         lambda room: body.max_tokens or DEFAULT_COMPLETION_TOKENS, body.logprobs)
    rid, created, tokens = f"cmpl-{uuid.uuid4().hex}", int(time.time()), TokenText(tokenizer)
    echoes = [tokenizer.decode(ids) if body.echo else "" for ids in job.prompts for _ in range(body.n)]
    lp_builders = [LegacyLogprobs(tokens, len(e)) for e in echoes]

    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": choices, **extra}

    if not body.stream:
        choices = await collect_all(job, request, state)
        if choices is None:
            return Response(status_code=CLIENT_CLOSED)
        out = [{"index": i, "text": echoes[i] + c.text, "finish_reason": c.finish_reason,
                "logprobs": lp_builders[i].add(c.token_ids, c.logprobs) if body.logprobs is not None else None}
               for i, c in enumerate(choices)]
        return chunk(out, usage=usage(job.prompt_tokens, sum(len(c.token_ids) for c in choices)))

    more = {"usage": None} if body.include_usage else {}

    async def events():
        try:
            for i, e in enumerate(echoes):
                if e:
                    yield sse(chunk([{"index": i, "text": e, "logprobs": None, "finish_reason": None}], **more))
            async for i, u in job.updates(request.is_disconnected):
                if not (u.text or u.finished or (body.logprobs is not None and u.token_ids)):
                    continue
                lp = lp_builders[i].add(u.token_ids, u.logprobs) if body.logprobs is not None else None
                yield sse(chunk([{"index": i, "text": u.text, "logprobs": lp,
                                  "finish_reason": api_finish_reason(u.finish_reason)}], **more))
            if body.include_usage:
                yield sse(chunk([], usage=usage(job.prompt_tokens, job.seen_tokens)))
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            job.close(state.rate)

    return ProcessStream(events(), lambda: job.close(state.rate), media_type="text/event-stream",
                         headers=SSE_HEADERS)


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request, p: Principal = Depends(principal)):
    """A chat turn through the model's chat template (`n` samples), streamed as server-sent events when
    `stream` is set. A client that disconnects has its processes killed at once."""
    if body.tools:
        raise ApiError(400, "invalid_request_error", "tools are not supported by llmos; leave them out.")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise ApiError(400, "invalid_request_error", "response_format other than text is not supported by "
                       "llmos; leave it out.")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "invalid_request_error", "top_logprobs needs logprobs: true.")
    messages = [m.for_template() for m in body.messages]
    limit = body.max_completion_tokens or body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    state, job, tokenizer = await _start(request, p, body, lambda tok: [chat_prompt(messages, tok)],
                                         lambda room: limit or max(1, room), logprobs)
    rid, created, tokens = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), TokenText(tokenizer)

    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": choices, **extra}

    if not body.stream:
        choices = await collect_all(job, request, state)
        if choices is None:
            return Response(status_code=CLIENT_CLOSED)
        out = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": chat_logprobs(tokens, c.token_ids, c.logprobs) if body.logprobs else None}
               for i, c in enumerate(choices)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": out,
                "usage": usage(job.prompt_tokens, sum(len(c.token_ids) for c in choices))}

    more = {"usage": None} if body.include_usage else {}

    async def events():
        try:
            for i in range(body.n):
                yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}], **more))
            async for i, u in job.updates(request.is_disconnected):
                if not (u.text or u.finished or (body.logprobs and u.token_ids)):
                    continue
                lp = chat_logprobs(tokens, u.token_ids, u.logprobs) if body.logprobs else None
                yield sse(chunk([{"index": i, "delta": {"content": u.text} if u.text else {}, "logprobs": lp,
                                  "finish_reason": api_finish_reason(u.finish_reason)}], **more))
            if body.include_usage:
                yield sse(chunk([], usage=usage(job.prompt_tokens, job.seen_tokens)))
            yield "data: [DONE]\n\n"
        except ClientGone:
            return
        finally:
            job.close(state.rate)

    return ProcessStream(events(), lambda: job.close(state.rate), media_type="text/event-stream",
                         headers=SSE_HEADERS)
