"""The native process API: the kernel's system calls over HTTP (/v1/processes, /v1/hibernated, /v1/memory,
/v1/kv/map), with server-sent events for streaming and attaching.

Owns the JSON shapes of processes and of the KV map, and who may act on which process: a caller sees and acts on
its own processes, an admin on everyone's; another user's pid is a 403, an unknown one a 404. Never steps a kernel
(the engine does) and never sleeps on the event loop: kernel calls run in worker threads.

Endpoints (JSON bodies; errors are app.py's `{"error": {...}}`):
  POST   /v1/processes                {model, prompt | prompt_token_ids, sampling fields, nice, n, stream}
                                      -> 201 {pid, model, n, children} or, with stream, SSE of updates of the
                                      process and its n - 1 parallel samples; disconnecting kills them.
  GET    /v1/processes[?all=&finished=]   -> {processes: [row...]} (all=true: every owner, admins only)
  GET    /v1/processes/{pid}          -> row + text, output_token_ids, children
  GET    /v1/processes/{pid}/stream[?from_now=true|new=true]   SSE attach; disconnecting leaves it alone.
  POST   /v1/processes/{pid}/fork     {n} -> 201 {pids}
  POST   /v1/processes/{pid}/suspend | /resume        -> row
  POST   /v1/processes/{pid}/hibernate                -> {hid, pid}
  POST   /v1/processes/{pid}/renice   {nice} -> row
  DELETE /v1/processes/{pid}          -> the final row (kill; a hibernated process's image is deleted)
  GET    /v1/hibernated[?owner=]      -> {hibernated: [...]} (owner: admins only)
  POST   /v1/hibernated/{hid}/restore {model?} [?owner=] -> 201 {pid, model, hid}
  GET    /v1/memory                   -> {models: {name: Kernel.memory()}} (the caller's use; admins: all)
  GET    /v1/kv/map?model=M           -> the KV map below.

A row is `Kernel.ps()`'s (pid, owner, state, nice, parent, prompt_tokens, output_tokens, resident_blocks,
swapped_blocks, kv_bytes, tokens_per_s, age_s, preemptions, finish_reason) with `model` the daemon's name for it.
An SSE update is `data: {"pid", "text", "token_ids", "finished", "finish_reason"[, "logprobs"]}` (text and token
ids new since the previous update of that pid); a stream ends with `data: [DONE]`.

KV map (one model's device pool, then its host swap pool), run-length encoded in block-id order:
  {"model", "num_blocks", "block_size", "bytes_per_block",
   "runs": [[value, count], ...],         # counts sum to num_blocks
   "processes": {"<pid>": {"owner", "state"}, ...},   # every pid that appears in runs
   "swap": {"num_blocks", "runs": [[value, count], ...]}}
  value: "free" (unused), "cached" (held by no process, kept for prefix hits, reclaimable), a pid (int: the
  lowest pid holding it; blocks shared by fork or prefix hits have several holders) or "other" (held only by
  other users' processes: a non-admin never sees their pids).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos.errors import InvalidRequestError, ModelLoadError, ProcessNotFoundError
from llmos.kernel.hibernate import HibernationStore, default_store
from llmos.kernel.kernel import Kernel
from llmos.kernel.proc import Process
from llmos.model.sampling import SamplingParams
from llmos.server.app import ApiError, Principal, ServerState, check_owner, principal
from llmos.server.engine import Engine, Update
from llmos.server.models import Resident

log = logging.getLogger("llmos.server")

router = APIRouter(tags=["processes"])
_background: set[asyncio.Task] = set()  # tasks that charge tokens when a process ends (kept from the GC)


# ---- request bodies ------------------------------------------------------------------------------


class SamplingFields(BaseModel):
    """The sampling fields every generating request takes; see SamplingParams for their meaning."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def params(self) -> SamplingParams:
        """These fields as validated SamplingParams. Raises `InvalidRequestError` (a 400)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              seed=self.seed, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids),
                              ignore_eos=self.ignore_eos, logprobs=self.logprobs).validate()


class SpawnRequest(SamplingFields):
    model: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    nice: int = 0
    n: int = 1
    stream: bool = False


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 1


class ReniceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nice: int


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None


# ---- helpers shared with sessions ------------------------------------------------------------------


def get_state(request: Request) -> ServerState:
    return request.app.state.llmos


async def locked(kernel: Kernel, fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)` under the kernel lock, in a worker thread (a step may hold the lock for a while)."""
    def call():
        with kernel.lock:
            return fn(*args, **kwargs)
    return await asyncio.to_thread(call)


def sse(data: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def update_event(pid: int, u: Update) -> dict:
    """The JSON of one streamed update of process `pid`."""
    event = {"pid": pid, "text": u.text, "token_ids": u.token_ids, "finished": u.finished,
             "finish_reason": u.finish_reason}
    if u.logprobs:
        event["logprobs"] = [[lp, [list(t) for t in top]] for lp, top in u.logprobs]
    return event


def sse_response(events: AsyncIterator[str], headers: dict | None = None) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


def in_background(coro) -> None:
    """Run `coro` on the event loop without waiting for it (a reference is kept until it is done)."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def output_tokens(kernel: Kernel, pid: int) -> int:
    """Output tokens of `pid` (0 once the kernel has reaped it). Call under the kernel lock."""
    p = kernel.processes.get(pid)
    return p.num_output_tokens if p is not None else 0


async def follow_to_end(engine: Engine, pid: int) -> None:
    """Wait until `pid` ends (or the kernel has reaped it)."""
    try:
        async for _ in engine.follow(pid):
            pass
    except KeyError:  # reaped before or while we followed it
        pass


async def charge_at_end(state: ServerState, r: Resident, user: str, pid: int, prompt_tokens: int = 0,
                        inherited: int = 0, parallel: int = 0) -> None:
    """Charge `user`'s token rate when `pid` ends: `prompt_tokens` plus the output tokens it generated
    (minus `inherited`, those it had when it was forked), and with `parallel` > 0 the output of its first
    `parallel` children (the n - 1 parallel samples, forked at its first token), each once it ends."""
    await follow_to_end(r.engine, pid)
    kids = (await locked(r.kernel, r.kernel.children, pid))[:parallel] if parallel else []
    for c in kids:
        await follow_to_end(r.engine, c)
    total = await locked(r.kernel, lambda: prompt_tokens + output_tokens(r.kernel, pid) - inherited
                         + sum(output_tokens(r.kernel, c) for c in kids))
    state.rate.charge(user, total)


async def find_process(state: ServerState, who: Principal, pid: int) -> tuple[Resident, Process]:
    """The resident model running `pid` and the process. 404 for an unknown pid, 403 for another user's."""
    r = await asyncio.to_thread(state.models.find, pid)
    p = await locked(r.kernel, r.kernel.get, pid)
    check_owner(who, p.owner, f"process {pid}")
    return r, p


def row(r: Resident, pid: int, detail: bool = False) -> dict:
    """Process `pid`'s ps row (with the daemon's model name); `detail` adds text, output ids and children.
    Call under the kernel lock."""
    kernel = r.kernel
    p = kernel.processes.get(pid)
    if p is None:  # reaped (KernelConfig.keep_finished)
        raise ProcessNotFoundError(f"process {pid} has ended and is no longer in the process table.")
    out = next(x for x in kernel.ps(owner=p.owner, all=True) if x["pid"] == pid)
    out["model"] = r.name
    text = out.pop("text")
    if detail:
        out.update(text=text, output_token_ids=list(p.output_token_ids), children=kernel.children(pid))
    return out


async def act(r: Resident, pid: int, syscall: Callable, *args, detail: bool = False) -> dict:
    """`syscall(pid, *args)` on r's kernel, then pid's row, both under the kernel lock in a worker thread."""
    def call() -> dict:
        syscall(pid, *args)
        return row(r, pid, detail)
    return await locked(r.kernel, call)


def residents(state: ServerState) -> list[Resident]:
    with state.models.lock:
        return list(state.models.resident.values())


def resident(state: ServerState, model: str | None) -> Resident:
    """A loaded model by name (the only one when `model` is None). Never loads one: 404 when it is not loaded."""
    loaded = residents(state)
    if model is None:
        if len(loaded) == 1:
            return loaded[0]
        raise ApiError(400, "invalid_request_error", f"{len(loaded)} models are loaded; name one with ?model= "
                       f"({', '.join(r.name for r in loaded) or 'none loaded'}).")
    for r in loaded:
        if r.name == model:
            return r
    raise ApiError(404, "not_found", f"model {model!r} is not loaded; GET /health lists the loaded models.")


# ---- spawn and stream -------------------------------------------------------------------------------


@router.post("/v1/processes", status_code=201)
async def spawn(body: SpawnRequest, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """Start a generation. Without `stream`: 201 and its pid (with `n` > 1 the other samples are forked when the
    prompt is done; GET the pid for `children`). With `stream`: SSE of the updates of every sample."""
    if (body.prompt is None) == (body.prompt_token_ids is None):
        raise ApiError(400, "invalid_request_error", "give exactly one of prompt (text) and prompt_token_ids.")
    check_nice_allowed(who, body.nice)
    params = body.params()
    r = await asyncio.to_thread(state.engine_for, body.model, who)
    state.rate.check(who)
    prompt = body.prompt if body.prompt is not None else body.prompt_token_ids
    p = await asyncio.to_thread(r.kernel.spawn, prompt, params, who.name, body.nice, body.n)
    r.engine.wake()
    if body.stream:
        return sse_response(_spawn_events(state, r, who.name, p.pid, p.num_prompt_tokens, body.n - 1),
                            headers={"X-Llmos-Pid": str(p.pid)})
    in_background(charge_at_end(state, r, who.name, p.pid, p.num_prompt_tokens, parallel=body.n - 1))
    return {"pid": p.pid, "model": r.name, "n": body.n, "children": []}


async def family_updates(engine: Engine, kernel: Kernel, pid: int, parallel: int) -> AsyncIterator[tuple[int, Update]]:
    """(pid, update) pairs of `pid` and, from its first update on, of its first `parallel` children, as they
    come, until all have ended."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(x: int) -> None:
        try:
            async for u in engine.follow(x):
                queue.put_nowait((x, u))
        except KeyError:
            pass
        finally:
            queue.put_nowait((x, None))

    tasks = [asyncio.create_task(pump(pid))]
    live, looked = 1, parallel == 0
    try:
        while live:
            x, u = await queue.get()
            if u is None:
                live -= 1
                continue
            if not looked and x == pid:  # parallel samples are forked at the first token
                looked = True
                for c in (await locked(kernel, kernel.children, pid))[:parallel]:
                    tasks.append(asyncio.create_task(pump(c)))
                    live += 1
            yield x, u
    finally:
        for t in tasks:
            t.cancel()


async def _spawn_events(state: ServerState, r: Resident, user: str, pid: int, prompt_tokens: int,
                        parallel: int) -> AsyncIterator[str]:
    """SSE of a spawned family. If the client goes away first, the family is killed; either way the tokens
    are charged."""
    ended = False
    try:
        async for x, u in family_updates(r.engine, r.kernel, pid, parallel):
            yield sse(update_event(x, u))
        ended = True
        yield sse("[DONE]")
    finally:
        kernel, engine = r.kernel, r.engine

        def settle() -> None:  # in a worker thread: we may be inside a cancellation here, so nothing awaits
            with kernel.lock:
                family = [pid] + kernel.children(pid)[:parallel] if pid in kernel.processes else []
                if not ended:
                    for x in family:
                        if x in kernel.processes and not kernel.processes[x].is_finished:
                            kernel.kill(x)
                tokens = prompt_tokens + sum(output_tokens(kernel, x) for x in family)
            for x in family:
                engine.notify(x)
            state.rate.charge(user, tokens)

        asyncio.get_running_loop().run_in_executor(None, settle)


@router.get("/v1/processes/{pid}/stream")
async def attach(pid: int, from_now: bool = False, new: bool = False, who: Principal = Depends(principal),
                 state: ServerState = Depends(get_state)):
    """SSE of process `pid`'s updates, from its first output token; with `from_now`, from what comes next; with
    `new`, from the first token this daemon generated (a restored process's earlier text is not sent again).
    Any number of clients may attach; disconnecting leaves the process running."""
    r, _ = await find_process(state, who, pid)

    async def events() -> AsyncIterator[str]:
        try:
            async for u in r.engine.follow(pid, from_now, new):
                yield sse(update_event(pid, u))
        except KeyError:  # reaped while we followed it
            pass
        yield sse("[DONE]")

    return sse_response(events(), headers={"X-Llmos-Pid": str(pid)})


# ---- process table ------------------------------------------------------------------------------------


@router.get("/v1/processes")
async def list_processes(everyone: bool = Query(False, alias="all"), finished: bool = False,
                         who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """The caller's live processes in every loaded model (`finished`: ended ones too; `all`: every owner's,
    admins only)."""
    if everyone and not who.is_admin:
        raise ApiError(403, "permission_error", f"all=true lists every user's processes; user {who.name!r} is "
                       "not an admin.")
    rows = []
    for r in residents(state):
        for x in await asyncio.to_thread(r.kernel.ps, None if everyone else who.name, finished):
            x.pop("text")
            rows.append({**x, "model": r.name})
    return {"processes": sorted(rows, key=lambda x: x["pid"])}


@router.get("/v1/processes/{pid}")
async def get_process(pid: int, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    r, _ = await find_process(state, who, pid)
    return await locked(r.kernel, row, r, pid, True)


@router.delete("/v1/processes/{pid}")
async def kill(pid: int, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """Kill `pid`; returns its final row. A hibernated process's image is deleted (it is KILLED and can no longer
    be restored); a 400 when that image runs again as another process. A no-op for a finished or killed one."""
    r, _ = await find_process(state, who, pid)
    out = await act(r, pid, r.kernel.kill, detail=True)
    r.engine.notify(pid)
    return out


@router.post("/v1/processes/{pid}/fork", status_code=201)
async def fork(pid: int, body: ForkRequest | None = None, who: Principal = Depends(principal),
               state: ServerState = Depends(get_state)):
    """`n` children that continue from where `pid` is now (copy-on-write KV); returns their pids."""
    r, p = await find_process(state, who, pid)
    state.rate.check(who)
    n = (body or ForkRequest()).n

    def do() -> list[tuple[int, int]]:
        return [(c.pid, c.num_output_tokens) for c in r.kernel.fork(pid, n)]

    children = await locked(r.kernel, do)
    r.engine.wake()
    for c, inherited in children:
        in_background(charge_at_end(state, r, p.owner, c, inherited=inherited))
    return {"pids": [c for c, _ in children]}


@router.post("/v1/processes/{pid}/suspend")
async def suspend(pid: int, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """Stop scheduling `pid`; its K/V go to host swap when they fit (else they are recomputed on resume)."""
    r, _ = await find_process(state, who, pid)
    out = await act(r, pid, r.kernel.suspend)
    r.engine.notify(pid)
    return out


@router.post("/v1/processes/{pid}/resume")
async def resume(pid: int, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    r, _ = await find_process(state, who, pid)
    out = await act(r, pid, r.kernel.resume)
    r.engine.wake()
    return out


def check_nice_allowed(who: Principal, nice) -> None:
    """403 for a negative nice level from a non-admin: favouring one's own processes over everyone else's is an
    admin's call (as for root and nice(2))."""
    if isinstance(nice, int) and nice < 0 and not who.is_admin:
        raise ApiError(403, "permission_error", f"nice {nice} would favour your processes over other users'; only "
                       "an admin may set a nice level below 0.")


@router.post("/v1/processes/{pid}/renice")
async def renice(body: ReniceRequest, pid: int, who: Principal = Depends(principal),
                 state: ServerState = Depends(get_state)):
    """Set `pid`'s nice level (-20..19; lower runs first under the priority policy). As in Unix, only an admin
    may go below 0."""
    check_nice_allowed(who, body.nice)
    r, _ = await find_process(state, who, pid)
    return await act(r, pid, r.kernel.nice, body.nice)


@router.post("/v1/processes/{pid}/hibernate")
async def hibernate(pid: int, who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """Write `pid` (tokens, sampling state, K/V) to disk and end it here; POST /v1/hibernated/{hid}/restore
    brings it back, in this daemon or after a restart."""
    r, _ = await find_process(state, who, pid)
    hid = await locked(r.kernel, r.kernel.hibernate, pid)
    r.engine.notify(pid)
    return {"hid": hid, "pid": pid}


# ---- hibernated processes -------------------------------------------------------------------------------


def _image_owner(who: Principal, owner: str | None) -> str:
    if owner is None or owner == who.name:
        return who.name
    if not who.is_admin:
        raise ApiError(403, "permission_error", f"hibernated processes of {owner!r} belong to another user.")
    return owner


def _store(state: ServerState) -> HibernationStore:
    d = state.settings.kernel.hibernate_dir
    return HibernationStore(Path(d)) if d else default_store()


@router.get("/v1/hibernated")
async def list_hibernated(owner: str | None = None, who: Principal = Depends(principal),
                          state: ServerState = Depends(get_state)):
    """The caller's hibernated processes on disk (admins: any `owner`'s), oldest first."""
    owner = _image_owner(who, owner)
    return {"hibernated": await asyncio.to_thread(_store(state).list, owner)}


@router.post("/v1/hibernated/{hid}/restore", status_code=201)
async def restore(hid: str, body: RestoreRequest | None = None, owner: str | None = Query(None),
                  who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """Bring hibernated process `hid` back as a new process (new pid) on `model` (default: the model it was
    hibernated from, by name)."""
    owner = _image_owner(who, owner)
    model = (body or RestoreRequest()).model
    if model is not None:
        r = await asyncio.to_thread(state.engine_for, model, who)
    else:
        entry = next((e for e in await asyncio.to_thread(_store(state).list, owner) if e["hid"] == hid), None)
        if entry is None or entry["model"] is None:
            raise ApiError(404, "hibernation_error", f"no hibernated process {hid} (or it is corrupt); "
                           "GET /v1/hibernated lists them.")
        model = next((r.name for r in residents(state) if entry["model"] in (r.name, r.path.name)), entry["model"])
        try:
            r = await asyncio.to_thread(state.engine_for, model, who)
        except ModelLoadError as e:
            raise InvalidRequestError(f"{e} Name the model to restore {hid} on: {{\"model\": NAME}}.") from None
    state.rate.check(who)
    p = await locked(r.kernel, r.kernel.restore, hid, owner)
    r.engine.wake()
    in_background(charge_at_end(state, r, owner, p.pid, inherited=p.output_tokens_at_start))
    return {"pid": p.pid, "model": r.name, "hid": hid}


# ---- memory ------------------------------------------------------------------------------------------------


@router.get("/v1/memory")
async def memory(who: Principal = Depends(principal), state: ServerState = Depends(get_state)):
    """KV pool, swap and prefix-cache use of every loaded model; per-owner use of the caller (admins: all)."""
    owner = None if who.is_admin else who.name
    return {"models": {r.name: await asyncio.to_thread(r.kernel.memory, owner) for r in residents(state)}}


@router.get("/v1/kv/map")
async def kv_map(model: str | None = None, who: Principal = Depends(principal),
                 state: ServerState = Depends(get_state)):
    """Who holds each KV block of a loaded model (format in the module docstring)."""
    r = resident(state, model)
    return JSONResponse(await locked(r.kernel, block_map, r, who))


def block_map(r: Resident, who: Principal) -> dict:
    """The KV map of `r`'s kernel as `who` may see it. Call under the kernel lock."""
    kernel = r.kernel
    bm = kernel.block_manager
    visible = {pid for pid, p in kernel.processes.items() if who.is_admin or p.owner == who.name}
    shown: set[int] = set()

    def holder(pids: list[int]) -> int | str:
        mine = [pid for pid in pids if pid in visible]
        if not mine:
            return "other"
        shown.add(min(mine))
        return min(mine)

    holders: list[list[int]] = [[] for _ in range(bm.num_blocks)]
    for pid, table in bm.block_tables.items():
        for b in table:
            holders[b].append(pid)
    device = [holder(holders[b]) if holders[b] else ("cached" if bm.block_hashes[b] is not None else "free")
              for b in range(bm.num_blocks)]
    swap_holders: list[list[int]] = [[] for _ in range(bm.num_swap_blocks)]
    for pid, table in bm.swap_tables.items():
        for b in table:
            swap_holders[b].append(pid)
    swap = [holder(h) if h else "free" for h in swap_holders]
    return {"model": r.name, "num_blocks": bm.num_blocks, "block_size": bm.block_size,
            "bytes_per_block": kernel.pool.nbytes // max(1, kernel.pool.num_blocks), "runs": _runs(device),
            "processes": {str(pid): {"owner": kernel.processes[pid].owner, "state": kernel.processes[pid].state.name}
                          for pid in sorted(shown) if pid in kernel.processes},
            "swap": {"num_blocks": bm.num_swap_blocks, "runs": _runs(swap)}}


def _runs(values: list) -> list[list]:
    """Run-length encoding: [[value, count], ...] of consecutive equal values."""
    out: list[list] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out
