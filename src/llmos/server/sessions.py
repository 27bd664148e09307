"""Persistent chat sessions (/v1/sessions): the history lives in SQLite (llmos.fs.sessions), each reply is a
kernel process over the chat template of the whole history, and the conversation's K/V outlive the daemon.

Owns the session endpoints and the session K/V files. While the model stays loaded the prefix cache (salted per
owner) makes the shared history cheap. When a session has been idle `session_idle_s` seconds, when its model
unloads and at daemon shutdown, the K/V of its conversation so far (the full blocks of its last reply's tokens
still in the prefix cache) are written to LLMOS_HOME/sessions/<owner digest>/<id>.safetensors (a hibernation image
of a synthetic process, atomic, 0600). The next message on a kernel that has not got them (after a restart or a
reload) puts them back with `Kernel.warm_prefix`, so only the new message is computed. The file is a cache: a
missing, corrupt or foreign one is ignored with a warning and the reply is computed from the history. Never
writes a message unless its reply finished (stop or length): an aborted turn leaves the history unchanged.

Endpoints (JSON; errors are app.py's):
  POST   /v1/sessions                 {model, system?, title?} -> 201 {id, model, title, created}
  GET    /v1/sessions[?all=true]      -> {sessions: [{id, owner, model, title, created, updated, messages}]}
  GET    /v1/sessions/{id}            -> {id, owner, model, title, created, updated, messages: [{role, content,
                                         created}], kv: {saved, bytes}}
  POST   /v1/sessions/{id}/messages   {content, sampling fields, stream = true} -> SSE of the reply's updates
                                      (as /v1/processes), then `data: {"message", "finish_reason", "usage", "pid"}`
                                      and `data: [DONE]`; without stream that last object as JSON. 409 while a
                                      reply of the session is still being generated.
  DELETE /v1/sessions/{id}            -> {id, deleted: true} (kills a reply in progress, removes the K/V file)
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict

from llmos.errors import HibernationError, InvalidRequestError
from llmos.fs.sessions import Session, SessionsError, SessionStore
from llmos.kernel.hibernate import HibernationImage, load_image, params_to_dict, save_image
from llmos.kernel.kernel import Kernel
from llmos.kernel.kvcache import chain_hash
from llmos.kernel.proc import Process
from llmos.model.sampling import SamplingParams
from llmos.server.app import ApiError, Principal, ServerState, check_owner, principal
from llmos.server.models import ModelManager, Resident
from llmos.server.native_api import SamplingFields, get_state, sse, sse_response, update_event

log = logging.getLogger("llmos.server")

router = APIRouter(tags=["sessions"])

session_idle_s = 120.0  # seconds without a message before a session's K/V are saved (read at every check)
MAX_TITLE = 200


# ---- request bodies ----------------------------------------------------------------------------------


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    system: str | None = None
    title: str | None = None


class MessageRequest(SamplingFields):
    content: str
    stream: bool = True


# ---- the daemon's side of a session -------------------------------------------------------------------


@dataclass
class Runtime:
    """What the daemon knows of a session beyond SQLite. `kernel`: the kernel whose prefix cache holds the
    conversation's K/V (a weak reference; None before the first reply of this daemon). `token_ids`: the last
    reply's prompt + output tokens, which that cache holds. `dirty`: not saved since. `pid`: the reply being
    generated, if any. `last_used`: monotonic seconds."""

    id: str
    owner: str
    kernel: weakref.ref | None = None
    token_ids: list[int] = field(default_factory=list)
    dirty: bool = False
    pid: int | None = None
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


class SessionManager:
    """The runtimes of one daemon's sessions, and the saving and warming of their K/V.

    A background thread (started with the first reply) saves sessions idle for `session_idle_s`; `shutdown` (a
    ServerState shutdown hook) and `on_unload` (a ModelManager hook) save the rest."""

    def __init__(self, models: ModelManager, store: SessionStore | None = None) -> None:
        self.models = models
        self.store = store or SessionStore()
        self.runtimes: dict[str, Runtime] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, s: Session) -> Runtime:
        """Mark session `s` as generating a reply. Raises a 409 ApiError if it already is."""
        with self.lock:
            rt = self.runtimes.setdefault(s.id, Runtime(s.id, s.owner))
            if rt.busy:
                raise ApiError(409, "conflict", f"session {s.id} is still generating a reply (pid {rt.pid}); wait "
                               "for it to finish, or kill it.")
            rt.busy, rt.last_used = True, time.monotonic()
            return rt

    def end(self, rt: Runtime, kernel: Kernel | None = None, token_ids: list[int] | None = None) -> None:
        """The reply is over; with `kernel` and `token_ids` it finished and its K/V sit in that kernel's cache."""
        with self.lock:
            rt.busy, rt.pid, rt.last_used = False, None, time.monotonic()
            if kernel is not None and token_ids:
                rt.kernel, rt.token_ids, rt.dirty = weakref.ref(kernel), list(token_ids), True
                self._start()

    def forget(self, sid: str) -> Runtime | None:
        with self.lock:
            return self.runtimes.pop(sid, None)

    # ---- K/V on disk --------------------------------------------------------------------------------

    def warm(self, rt: Runtime, r: Resident) -> int:
        """Put the session's saved K/V into r's prefix cache unless that kernel already holds them. Returns the
        blocks put back (0: none saved, already there, or a bad file, which is logged and ignored)."""
        kernel = r.kernel
        if rt.kernel is not None and rt.kernel() is kernel:
            return 0
        path = self.store.kv_path(rt.owner, rt.id)
        if not path.is_file():
            return 0
        try:
            image = load_image(path, expected_fingerprint=kernel.fingerprint)
            if image.owner != rt.owner or image.extra.get("session") != rt.id or image.kv is None:
                raise HibernationError(f"{path} belongs to another session")
            n = kernel.warm_prefix(image.prompt_token_ids, image.kv, rt.owner)
        except (HibernationError, ValueError) as e:
            log.warning("ignoring the saved K/V of session %s (the reply is computed from its history): %s", rt.id, e)
            return 0
        log.info("session %s: %d K/V blocks back in the prefix cache of %s", rt.id, n, r.name)
        return n

    def save(self, rt: Runtime) -> bool:
        """Write the K/V of rt's conversation (its last reply's leading full blocks still in the prefix cache) to
        its file. False when there is nothing new to save or the kernel is gone; a write error is logged."""
        with self.lock:
            kernel = rt.kernel() if rt.kernel is not None else None
            if not rt.dirty or rt.busy or kernel is None:
                return False
            rt.dirty, ids = False, list(rt.token_ids)  # a reply that ends meanwhile sets dirty again
        ids, kv = cached_prefix(kernel, ids, rt.owner)
        if kv is None:
            return False
        image = HibernationImage(owner=rt.owner, model_name=kernel.model_name, model_fingerprint=kernel.fingerprint,
                                 prompt_token_ids=ids, output_token_ids=[], num_computed_tokens=len(ids),
                                 params=params_to_dict(SamplingParams()), block_size=kernel.block_manager.block_size,
                                 kv=kv, extra={"session": rt.id})
        path = self.store.kv_path(rt.owner, rt.id)
        try:
            for d in (path.parent.parent, path.parent):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)
            save_image(path, image)
        except (HibernationError, OSError) as e:
            log.warning("cannot save the K/V of session %s (it will be computed again after a restart): %s", rt.id, e)
            return False
        with self.lock:
            deleted = rt.id not in self.runtimes
        if deleted:  # the session was deleted while we wrote
            path.unlink(missing_ok=True)
        return not deleted

    def save_idle(self, now: float | None = None) -> int:
        """Save every session idle for `session_idle_s` seconds or more; returns how many were saved."""
        now = time.monotonic() if now is None else now
        with self.lock:
            idle = [rt for rt in self.runtimes.values() if rt.dirty and not rt.busy
                    and now - rt.last_used >= session_idle_s]
        return sum(self.save(rt) for rt in idle)

    def save_all(self, kernel: Kernel | None = None) -> int:
        """Save every session with unsaved K/V (only those in `kernel`'s cache, when given)."""
        with self.lock:
            todo = [rt for rt in self.runtimes.values()
                    if rt.dirty and (kernel is None or (rt.kernel is not None and rt.kernel() is kernel))]
        return sum(self.save(rt) for rt in todo)

    def on_unload(self, r: Resident) -> None:
        """ModelManager hook: the model's engine has stopped; save its sessions before its cache is gone."""
        self.save_all(r.kernel)

    def shutdown(self) -> None:
        """ServerState shutdown hook (before the models unload): stop the idle thread, save every session."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        n = self.save_all()
        if n:
            log.info("saved the K/V of %d session(s)", n)

    def _start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._idle_loop, name="llmos-sessions", daemon=True)
            self._thread.start()

    def _idle_loop(self) -> None:
        while not self._stop.wait(max(0.05, min(1.0, session_idle_s / 4))):
            try:
                self.save_idle()
            except Exception:
                log.exception("saving idle sessions failed")


def cached_prefix(kernel: Kernel, token_ids: list[int], owner: str) -> tuple[list[int], torch.Tensor | None]:
    """The leading full blocks of `token_ids` that `owner`'s prefix cache in `kernel` holds: (their tokens, their
    K/V [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] on the CPU), or ([], None)."""
    with kernel.lock:
        bm = kernel.block_manager
        if not bm.enable_prefix_cache:
            return [], None
        bs, prev, blocks = bm.block_size, b"", []
        for i in range(len(token_ids) // bs):
            prev = chain_hash(prev, owner, token_ids[i * bs:(i + 1) * bs])  # the owner is the kernel's cache salt
            block = bm.hash_to_block.get(prev)
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            return [], None
        return list(token_ids[:len(blocks) * bs]), kernel.pool.read_blocks(blocks)


_managers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_managers_lock = threading.Lock()


def manager(state: ServerState) -> SessionManager:
    """The daemon's SessionManager, created (and hooked into shutdown and model unloads) on first use."""
    with _managers_lock:
        m = _managers.get(state)
        if m is None:
            m = _managers[state] = SessionManager(state.models)
            state.shutdown_hooks.append(m.shutdown)
            if isinstance(state.models.on_unload, list):
                state.models.on_unload.append(m.on_unload)
        return m


def setup(state: ServerState) -> None:
    """Called once by create_app."""
    manager(state)


# ---- endpoints -----------------------------------------------------------------------------------------


async def find_session(state: ServerState, who: Principal, sid: str) -> Session:
    """Session `sid`: 404 when unknown, 403 when another user's."""
    s = await asyncio.to_thread(manager(state).store.get, sid)
    if s is None:
        raise ApiError(404, "not_found", f"no session {sid!r}; GET /v1/sessions lists yours.")
    check_owner(who, s.owner, f"session {sid}")
    return s


def session_json(s: Session) -> dict:
    return {"id": s.id, "owner": s.owner, "model": s.model, "title": s.title, "created": s.created,
            "updated": s.updated, "messages": s.messages}


@router.post("/v1/sessions", status_code=201)
async def create_session(body: CreateSession, who: Principal = Depends(principal),
                         state: ServerState = Depends(get_state)):
    """A new chat on `model` (not loaded until the first message), with an optional system prompt and title."""
    if body.title is not None and len(body.title) > MAX_TITLE:
        raise InvalidRequestError(f"the title has {len(body.title)} characters; keep it to {MAX_TITLE}.")
    for name, text in (("title", body.title), ("system", body.system), ("model", body.model)):
        _check_unicode(name, text)
    await asyncio.to_thread(state.models.path_of, body.model)  # 404 for an unknown model
    s = await asyncio.to_thread(manager(state).store.create, who.name, body.model, body.title, body.system)
    return {"id": s.id, "model": s.model, "title": s.title, "created": s.created}


@router.get("/v1/sessions")
async def list_sessions(everyone: bool = Query(False, alias="all"), who: Principal = Depends(principal),
                        state: ServerState = Depends(get_state)):
    """The caller's sessions, most recently updated first (`all`: everyone's, admins only)."""
    if everyone and not who.is_admin:
        raise ApiError(403, "permission_error", f"all=true lists every user's sessions; user {who.name!r} is "
                       "not an admin.")
    sessions = await asyncio.to_thread(manager(state).store.list, None if everyone else who.name)
    return {"sessions": [session_json(s) for s in sessions]}


@router.get("/v1/sessions/{sid}")
async def get_session(sid: str, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """A session with its whole history and whether its K/V are saved on disk."""
    s = await find_session(state, who, sid)
    store = manager(state).store
    messages = await asyncio.to_thread(store.messages, sid)
    path = store.kv_path(s.owner, sid)
    size = path.stat().st_size if path.is_file() else 0
    return {**session_json(s), "messages": [{"role": m.role, "content": m.content, "created": m.created}
                                            for m in messages],
            "kv": {"saved": size > 0, "bytes": size}}


@router.delete("/v1/sessions/{sid}")
async def delete_session(sid: str, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """Delete a session, its history and its saved K/V; a reply in progress is killed."""
    await find_session(state, who, sid)
    m = manager(state)
    rt = m.forget(sid)
    if rt is not None and rt.pid is not None:
        try:
            r = await asyncio.to_thread(state.models.find, rt.pid)
            await asyncio.to_thread(r.kernel.kill, rt.pid)
            r.engine.notify(rt.pid)
        except Exception:  # it ended meanwhile
            pass
    try:
        await asyncio.to_thread(m.store.delete, sid)
    except SessionsError:
        raise ApiError(404, "not_found", f"no session {sid!r}; it was deleted meanwhile.") from None
    return {"id": sid, "deleted": True}


@router.post("/v1/sessions/{sid}/messages")
async def post_message(sid: str, body: MessageRequest, who: Principal = Depends(principal),
                       state: ServerState = Depends(get_state)):
    """Append a user message and generate the assistant's reply over the whole history (streamed by default).
    Both messages are stored when the reply finishes."""
    s = await find_session(state, who, sid)
    _check_unicode("content", body.content)
    if not body.content:
        raise InvalidRequestError("the message content is empty; write something.")
    params = body.params()
    m = manager(state)
    r = await asyncio.to_thread(state.engine_for, s.model, who)
    state.rate.check(who)
    rt = m.begin(s)
    try:
        history = await asyncio.to_thread(m.store.messages, sid)
        chat = [x.as_chat() for x in history] + [{"role": "user", "content": body.content}]
        ids = await asyncio.to_thread(fit_prompt, r.kernel, chat, params.max_tokens)
        restored = await asyncio.to_thread(m.warm, rt, r)
        p = await asyncio.to_thread(r.kernel.spawn, ids, params, s.owner)
        rt.pid = p.pid
    except BaseException:
        m.end(rt)
        raise
    r.engine.wake()
    reply = Reply(state, m, rt, r, s, body.content, p, restored)
    if body.stream:
        return sse_response(reply.events(), headers={"X-Llmos-Pid": str(p.pid)})
    try:
        update = await r.engine.wait(p.pid)
    except BaseException:  # cancelled (or reaped): end the turn without waiting
        asyncio.get_running_loop().run_in_executor(None, reply.settle, "")
        raise
    return await asyncio.to_thread(reply.settle, update.text)


class Reply:
    """One assistant reply being generated: its stream, and what happens when it ends (`settle`)."""

    def __init__(self, state: ServerState, m: SessionManager, rt: Runtime, r: Resident, s: Session, content: str,
                 p: Process, restored: int) -> None:
        self.state, self.m, self.rt, self.r, self.s, self.content, self.p = state, m, rt, r, s, content, p
        self.restored = restored
        self.settled = False
        self._settle_lock = threading.Lock()

    async def events(self) -> AsyncIterator[str]:
        """SSE of the reply; the final event is settle()'s result. A client that goes away kills the reply."""
        text = []
        try:
            try:
                async for u in self.r.engine.follow(self.p.pid):
                    text.append(u.text)
                    yield sse(update_event(self.p.pid, u))
            except KeyError:  # reaped: ended long ago
                pass
            yield sse(await asyncio.to_thread(self.settle, "".join(text)))
            yield sse("[DONE]")
        finally:
            if not self.settled:  # the client went away: nothing may await here (we may be cancelled)
                asyncio.get_running_loop().run_in_executor(None, self.settle, "".join(text))

    def settle(self, text: str) -> dict:
        """End the turn, once: kill the reply if it is still running, charge its tokens, store both messages if
        it ended by stop or length (its text from the kernel, else `text`, what was streamed), and release the
        session. Returns the final event."""
        with self._settle_lock:
            if self.settled:
                return {}
            self.settled = True
        kernel, p = self.r.kernel, self.p
        with kernel.lock:
            if not p.is_finished and p.pid in kernel.processes:
                kernel.kill(p.pid)
            stream = kernel.streams.get(p.pid)
            text = stream.text[:stream.released] if stream is not None else text
            reason, token_ids = p.finish_reason, list(p.token_ids)
            prompt_tokens, completion_tokens = p.num_prompt_tokens, p.num_output_tokens
        self.r.engine.notify(p.pid)
        self.state.rate.charge(self.s.owner, prompt_tokens + completion_tokens)
        stored = False
        if reason in ("stop", "length"):
            try:
                self.m.store.append(self.s.id, [("user", self.content), ("assistant", text)])
                stored = True
            except SessionsError as e:  # deleted meanwhile
                log.info("reply of session %s not stored: %s", self.s.id, e)
        self.m.end(self.rt, kernel if stored else None, token_ids if stored else None)
        return {"pid": p.pid, "session": self.s.id, "message": {"role": "assistant", "content": text},
                "finish_reason": reason, "stored": stored,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "restored_kv_blocks": self.restored}}


def _check_unicode(name: str, text: str | None) -> None:
    """400 for text that cannot be stored or tokenized (a lone surrogate such as \\ud800, valid in JSON)."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(f"{name} is not valid Unicode text (it holds a lone surrogate); "
                                      "send valid UTF-8.") from None


def fit_prompt(kernel, chat: list[dict], max_tokens: int) -> list[int]:
    """The chat template over `chat` as token ids, leaving out the oldest turns (after any system message) until
    it leaves room to reply (min(max_tokens, half the context) tokens), as `llmos chat` does; the stored history
    keeps every message. The newest user message is always kept (a prompt too long on its own is a 413)."""
    tokenizer, context = kernel.tokenizer, kernel.context_length
    budget = context - min(max_tokens, context // 2)
    system = [c for c in chat[:1] if c["role"] == "system"]
    turns = chat[len(system):]
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(system + turns))
        if len(ids) <= budget or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # the oldest user message and its reply
