"""Ollama-compatible API: POST /api/generate and /api/chat (newline-delimited JSON streaming, on by default),
GET /api/tags, GET /api/ps, POST /api/show and GET /api/version.

Owns the translation between Ollama's request and response shapes and kernel processes (through
`openai_api.Job`, so a client that goes away has its process killed here too). Errors keep the daemon's
fields but put the message in a top-level string `error`, which is what Ollama clients read:
`{"error": "model 'x' not found; ...", "type": "model_error", "code": 404}`.
A chat message needs a role (system, user, assistant or tool) and string content; true/false where a number
belongs is a 400 that names the field.
Never samples, schedules or loads models itself.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from safetensors import safe_open

from llmos.errors import LlmosError
from llmos.model.sampling import SamplingParams
from llmos.model.tokenizer import Tokenizer
from llmos.server.app import ApiError, Principal, ServerState, llmos_error_status, principal
from llmos.server.openai_api import (CLIENT_CLOSED, ClientGone, Float, Int, ProcessStream, TokenText,
                                     api_finish_reason, chat_role, message_object, spawn_job)

FOREVER = timedelta(days=292 * 365)  # Ollama's "never expires" (the largest Go duration)


class OllamaRoute(APIRoute):
    """Routes whose errors carry the message as a top-level string `error` (Ollama clients show it as is)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as err:
                return ollama_error(err.status, err.type, err.message, err.headers)
            except LlmosError as err:
                status, type = llmos_error_status(err)
                return ollama_error(status, type, str(err), {"Retry-After": "5"} if status == 429 else None)
            except RequestValidationError as err:
                parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                         f"{e.get('msg', 'invalid')}" for e in err.errors()[:5]]
                return ollama_error(400, "invalid_request_error", "invalid request: " + "; ".join(parts))

        return route


def ollama_error(status: int, type: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": type, "code": status}, status_code=status, headers=headers)


router = APIRouter(route_class=OllamaRoute)


# ---- request bodies ----------------------------------------------------------------------------------


class OllamaOptions(BaseModel):
    """Ollama's runtime options that llmos honours; the others (num_ctx, num_thread, ...) are ignored.
    Defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9) except repeat_penalty (1.0, off: llmos'
    penalty covers the whole history, not Ollama's last 64 tokens). num_predict -1 or -2: up to the context."""

    model_config = ConfigDict(extra="ignore")

    temperature: Float = 0.8
    top_p: Float = 0.9
    top_k: Int = 40
    min_p: Float = 0.0
    seed: Int | None = None
    num_predict: Int = -1
    stop: str | list[str] | None = None
    repeat_penalty: Float = 1.0
    presence_penalty: Float = Field(0.0, description="only 0 is supported")
    frequency_penalty: Float = Field(0.0, description="only 0 is supported")
    mirostat: Int = Field(0, description="only 0 (off) is supported")

    def sampling_params(self, room: int, logprobs: int | None) -> SamplingParams:
        """The kernel's parameters; `room` = context tokens left after the prompt. 400 for the unsupported."""
        for name in ("presence_penalty", "frequency_penalty", "mirostat"):
            if getattr(self, name):
                raise ApiError(400, "invalid_request_error", f"option {name} is not supported by llmos; leave it "
                               "out or set it to 0.")
        if self.num_predict == 0 or self.num_predict < -2:
            raise ApiError(400, "invalid_request_error", f"num_predict={self.num_predict}: give a number of "
                           "tokens >= 1, or -1 for up to the context window.")
        max_tokens = self.num_predict if self.num_predict > 0 else max(1, room)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repeat_penalty,
                              seed=self.seed, stop=tuple(stop), logprobs=logprobs).validate()


class _OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="a name from GET /api/tags (a ':latest' tag is accepted)")
    stream: bool = True
    options: OllamaOptions = Field(default_factory=OllamaOptions)
    keep_alive: float | str | None = Field(None, description="seconds, or a duration such as '5m'; 0 unloads "
                                           "after the request, negative keeps it loaded; absent leaves it as is")
    format: str | dict | None = Field(None, description="not supported (must be empty)")
    think: bool | str | None = Field(None, description="not supported")
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value):
        if isinstance(value, bool):
            raise PydanticCustomError("bool_not_number", "must be seconds or a duration such as '5m', not a "
                                      "boolean ({value})", {"value": json.dumps(value)})
        return value

    def check_supported(self) -> None:
        if self.format:
            raise ApiError(400, "invalid_request_error", "format (structured output) is not supported by llmos; "
                           "leave it out.")
        if self.think:
            raise ApiError(400, "invalid_request_error", "thinking is not supported by llmos; leave think out.")


class OllamaGenerateRequest(_OllamaRequest):
    """POST /api/generate. Without `raw` the prompt (and `system`) go through the model's chat template as one
    user turn; a model without a template gets the prompt as is (after `system` and a blank line). `context`
    (from a previous response) is prepended as token ids."""

    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    context: list[Int] | None = None
    suffix: str | None = Field(None, description="not supported")
    template: str | None = Field(None, description="not supported (the model's chat template is used)")
    images: list | None = Field(None, description="not supported")


CHAT_ROLES = ("system", "user", "assistant", "tool")


class OllamaMessage(BaseModel):
    """One message: `role` one of CHAT_ROLES, `content` a string (Ollama's shape: no content parts)."""

    model_config = ConfigDict(extra="ignore")
    role: str = Field(None, validate_default=True)
    content: str = Field(None, validate_default=True)
    images: list | None = None

    _object = model_validator(mode="before")(message_object)
    _role = field_validator("role", mode="before")(lambda value: chat_role(value, CHAT_ROLES))

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value):
        if value is None:
            raise PydanticCustomError("chat_content", "required: a string (the message text)")
        if not isinstance(value, str):
            raise PydanticCustomError("chat_content", "must be a string (the message text), not {value}",
                                      {"value": json.dumps(value)[:40]})
        return value


class OllamaChatRequest(_OllamaRequest):
    """POST /api/chat: `messages` through the model's chat template (llmos' plain template without one)."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list | None = Field(None, description="not supported (must be empty)")


# ---- helpers -------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


MAX_KEEP_ALIVE_S = 100 * 365 * 86400.0


def keep_alive_for(p: Principal, value) -> float | None | bool:
    """`keep_alive_seconds(value)` for an admin (single-user mode's local user is one); False (leave the model's
    keep-alive as it is) for other users, whose requests must not unload or pin a model everyone shares."""
    keep = keep_alive_seconds(value)
    return keep if p.is_admin else False


def keep_alive_seconds(value: float | str | None) -> float | None | bool:
    """Ollama's keep_alive as `engine_for` takes it: seconds (a number, a numeric string, or a Go duration such
    as "5m" or "1h30m"); negative -> None (keep loaded); absent -> False (leave as is). 400 if malformed."""
    if value is None:
        return False
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
            parts = _DURATION.findall(body)
            if not body or "".join(a + u for a, u in parts) != body:
                raise ApiError(400, "invalid_request_error", f"keep_alive {value!r} is not a duration; use seconds "
                               "or e.g. '5m', '1h', '0' (unload after the request), -1 (keep loaded).") from None
            seconds = sign * sum(float(a) * _UNIT_S[u] for a, u in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ApiError(400, "invalid_request_error", f"keep_alive {value!r} is not a finite duration.")
    return None if seconds < 0 or seconds > MAX_KEEP_ALIVE_S else seconds  # beyond ~100 years: forever


def model_name(state: ServerState, name: str) -> str:
    """`name`, or without its ':latest' tag when only the bare name exists (Ollama clients add it)."""
    if name.endswith(":latest") and name not in state.models.resident:
        bare = name[: -len(":latest")]
        if bare in state.models.resident or bare in state.models.available():
            return bare
    return name


def now_rfc3339(at: datetime | None = None) -> str:
    return (at or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ns(seconds: float | None) -> int:
    return max(0, int((seconds or 0.0) * 1e9))


@functools.lru_cache(maxsize=64)
def _facts(path: str, stamp: tuple) -> dict:
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    params, dtype = 0, None
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                s = sf.get_slice(key)
                params += math.prod(s.get_shape())
                dtype = dtype or s.get_dtype()
    family = config.get("model_type", "unknown")
    return {"family": family, "params": params, "dtype": dtype or "F32",
            "context_length": config.get("max_position_embeddings") or config.get("n_positions")}


def model_facts(path: Path) -> dict:
    """Size (bytes of safetensors), modification time, family (config's model_type), parameter count and
    dtype of the checkpoint in `path`, read from the file headers (cached while the files are unchanged)."""
    files = sorted(Path(path).glob("*.safetensors"))
    stats = [f.stat() for f in files]
    stamp = tuple((f.name, s.st_size, s.st_mtime_ns) for f, s in zip(files, stats))
    facts = dict(_facts(str(path), stamp))
    facts["size"] = sum(s.st_size for s in stats)
    facts["modified"] = datetime.fromtimestamp(max((s.st_mtime for s in stats), default=0), timezone.utc)
    return facts


def _parameter_size(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def details(facts: dict) -> dict:
    return {"parent_model": "", "format": "safetensors", "family": facts["family"], "families": [facts["family"]],
            "parameter_size": _parameter_size(facts["params"]), "quantization_level": facts["dtype"]}


def logprobs_out(tokens: TokenText, token_ids: list[int], logprobs: list) -> list[dict]:
    """Ollama's `logprobs`: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    return [{**tokens.entry(t, lp), "top_logprobs": [tokens.entry(a, v) for a, v in top]}
            for t, (lp, top) in zip(token_ids, logprobs)]


def generate_prompt(body: OllamaGenerateRequest, tokenizer: Tokenizer) -> list[int]:
    """The token ids /api/generate runs: `context`, then the prompt (templated unless `raw`)."""
    prompt = body.prompt or ""
    if body.raw:
        text, specials = prompt, True
    elif tokenizer.has_chat_template:
        turns = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": prompt}]
        text, specials = tokenizer.apply_chat_template(turns, add_generation_prompt=True), False
    else:  # a base model's template is the prompt itself
        text, specials = (f"{body.system}\n\n{prompt}" if body.system else prompt), True
    if body.context:
        return list(body.context) + tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=specials)


def chat_prompt(body: OllamaChatRequest, tokenizer: Tokenizer) -> list[int]:
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=not tokenizer.has_chat_template)


# ---- generation ----------------------------------------------------------------------------------------


async def _load_or_unload(state: ServerState, p: Principal, name: str, keep) -> dict:
    """An empty request: load the model (done_reason "load"), or with keep_alive 0 unload it ("unload")."""
    if keep is not False and keep == 0:
        r = state.models.resident.get(name)
        if r is not None and r.busy():
            r.keep_alive_s = 0.0  # the reaper unloads it once its processes end
        elif r is not None:
            await asyncio.to_thread(state.models.unload, name)
        else:
            await asyncio.to_thread(state.models.path_of, name)  # 404 for an unknown name
        reason = "unload"
    else:
        await asyncio.to_thread(state.engine_for, name, p, keep)
        reason = "load"
    return {"model": name, "created_at": now_rfc3339(), "done": True, "done_reason": reason}


async def _run(request: Request, p: Principal, body: _OllamaRequest, prompt_of, shape) -> Response | dict:
    """Spawn the request's process and answer as NDJSON lines (`stream`) or one JSON object. `shape(text,
    extra)` makes a response object from a text piece."""
    state: ServerState = request.app.state.llmos
    t0 = time.monotonic()
    body.check_supported()
    name = model_name(state, body.model)
    keep = keep_alive_for(p, body.keep_alive)
    state.rate.check(p)
    resident = await asyncio.to_thread(state.engine_for, name, p)
    load_s = time.monotonic() - t0
    tokenizer = resident.kernel.tokenizer
    ids = await asyncio.to_thread(prompt_of, tokenizer)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = body.options.sampling_params(resident.kernel.context_length - len(ids), logprobs)
    job = spawn_job(resident, p.name, [ids], params)
    if keep is not False:  # set after the spawn: a keep-alive of 0 must not unload the model before it runs
        try:
            await asyncio.to_thread(state.engine_for, name, p, keep)
        except BaseException:
            job.close(state.rate)
            raise
    tokens = TokenText(tokenizer)

    def piece(text: str, token_ids: list[int], lps: list) -> dict:
        out = shape(text, {"model": body.model, "created_at": now_rfc3339()})
        if body.logprobs:
            out["logprobs"] = logprobs_out(tokens, token_ids, lps)
        return out

    def final(out: dict, reason: str | None, output_ids: list[int]) -> dict:
        t = job.stats()
        first = t["first_token"] or t["finish"]
        out.update(done=True, done_reason=api_finish_reason(reason), total_duration=ns(time.monotonic() - t0),
                   load_duration=ns(load_s), prompt_eval_count=len(ids),
                   prompt_eval_duration=ns(first - t["arrival"] if first and t["arrival"] else 0),
                   eval_count=len(output_ids),
                   eval_duration=ns(t["finish"] - t["first_token"] if t["finish"] and t["first_token"] else 0))
        if isinstance(body, OllamaGenerateRequest):
            out["context"] = ids + output_ids
        return out

    if not body.stream:
        text, out_ids, lps, reason = "", [], [], None
        try:
            async for _, u in job.updates(request.is_disconnected):
                text, out_ids, lps, reason = text + u.text, out_ids + u.token_ids, lps + u.logprobs, u.finish_reason
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            job.close(state.rate)
        return final(piece(text, out_ids, lps), reason, out_ids)

    async def lines():
        out_ids = []
        try:
            async for _, u in job.updates(request.is_disconnected):
                out_ids += u.token_ids
                out = piece(u.text, u.token_ids, u.logprobs)
                if u.finished:
                    out = final(out, u.finish_reason, out_ids)
                elif not (u.text or (body.logprobs and u.token_ids)):
                    continue
                else:
                    out["done"] = False
                yield json.dumps(out, ensure_ascii=False) + "\n"
        except ClientGone:
            return
        finally:
            job.close(state.rate)

    return ProcessStream(lines(), lambda: job.close(state.rate), media_type="application/x-ndjson")


# ---- endpoints -------------------------------------------------------------------------------------------


@router.post("/api/generate", tags=["ollama"])
async def generate(body: OllamaGenerateRequest, request: Request, p: Principal = Depends(principal)):
    """Continue a prompt; streamed as newline-delimited JSON unless `stream` is false. No prompt: load the
    model (or unload it with keep_alive 0)."""
    if body.suffix or body.template or body.images:
        raise ApiError(400, "invalid_request_error", "suffix, template and images are not supported by llmos; "
                       "leave them out.")
    state: ServerState = request.app.state.llmos
    if not body.prompt and not body.context:
        return await _load_or_unload(state, p, model_name(state, body.model), keep_alive_for(p, body.keep_alive))
    return await _run(request, p, body, lambda tok: generate_prompt(body, tok),
                      lambda text, out: {**out, "response": text})


@router.post("/api/chat", tags=["ollama"])
async def chat(body: OllamaChatRequest, request: Request, p: Principal = Depends(principal)):
    """A chat turn; streamed as newline-delimited JSON unless `stream` is false. No messages: load the model
    (or unload it with keep_alive 0)."""
    if body.tools:
        raise ApiError(400, "invalid_request_error", "tools are not supported by llmos; leave them out.")
    if any(m.images for m in body.messages):
        raise ApiError(400, "invalid_request_error", "images are not supported by llmos; send text only.")
    state: ServerState = request.app.state.llmos
    if not body.messages:
        out = await _load_or_unload(state, p, model_name(state, body.model), keep_alive_for(p, body.keep_alive))
        return {**out, "message": {"role": "assistant", "content": ""}}
    return await _run(request, p, body, lambda tok: chat_prompt(body, tok),
                      lambda text, out: {**out, "message": {"role": "assistant", "content": text}})


@router.get("/api/tags", tags=["ollama"])
async def tags(request: Request, p: Principal = Depends(principal)) -> dict:
    """Every model a request may name, with its size in bytes and details."""
    state: ServerState = request.app.state.llmos

    def rows() -> list[dict]:
        out = []
        for name, path in sorted(state.models.available().items()):
            facts = model_facts(path)
            out.append({"name": name, "model": name, "modified_at": now_rfc3339(facts["modified"]),
                        "size": facts["size"], "digest": "", "details": details(facts)})
        return out

    return {"models": await asyncio.to_thread(rows)}


@router.get("/api/ps", tags=["ollama"])
async def ps(request: Request, p: Principal = Depends(principal)) -> dict:
    """The loaded models: bytes held (weights + KV pool + swap pool), when each unloads, context length."""
    state: ServerState = request.app.state.llmos
    now = datetime.now(timezone.utc)

    def rows() -> list[dict]:
        out = []
        for row in state.models.loaded():
            r = state.models.resident.get(row["name"])
            facts = model_facts(Path(row["path"]))
            left = row["expires_in_s"]
            on_device = r is not None and r.kernel.device.type != "cpu"
            out.append({"name": row["name"], "model": row["name"], "size": row["bytes"],
                        "size_vram": row["bytes"] if on_device else 0, "digest": "", "details": details(facts),
                        "expires_at": now_rfc3339(now + (FOREVER if left is None else timedelta(seconds=left))),
                        "context_length": r.kernel.context_length if r is not None else facts["context_length"]})
        return out

    return {"models": await asyncio.to_thread(rows)}


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = Field(None, description="older clients' spelling of model")


@router.post("/api/show", tags=["ollama"])
async def show(body: OllamaShowRequest, request: Request, p: Principal = Depends(principal)) -> dict:
    """A model's details, architecture facts and chat template."""
    state: ServerState = request.app.state.llmos
    name = body.model or body.name
    if not name:
        raise ApiError(400, "invalid_request_error", "give the model's name in `model`.")
    name = model_name(state, name)

    def info() -> dict:
        path = state.models.path_of(name)
        facts = model_facts(path)
        template = Tokenizer.from_dir(path).chat_template
        family = facts["family"]
        return {"modelfile": f"FROM {path}\n", "parameters": "", "template": template or "{{ .Prompt }}",
                "details": details(facts), "modified_at": now_rfc3339(facts["modified"]),
                "model_info": {"general.architecture": family, "general.parameter_count": facts["params"],
                               f"{family}.context_length": facts["context_length"]},
                "capabilities": ["completion"]}

    return await asyncio.to_thread(info)


@router.get("/api/version", tags=["ollama"])
async def version() -> dict:
    """llmos' version (Ollama clients read it as the server's)."""
    try:
        from importlib.metadata import version as package_version
        return {"version": package_version("llmos")}
    except Exception:
        return {"version": "0"}
