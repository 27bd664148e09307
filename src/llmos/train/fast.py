"""Faster pieces of the training step that compute the same thing: the LM head fused with a chunked
cross-entropy, fused AdamW, compiling the model body only, and a glibc allocator setting for training processes.

Owns these numerical helpers; the loop that calls them is `llmos.train.trainer`. Never changes what a step
computes: each helper equals its reference up to floating-point rounding (tests/bench/test_training_bench.py
checks it against `F.cross_entropy` and the for-loop `torch.optim.AdamW`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Iterable

import torch
import torch.nn.functional as F

from llmos.model import native

IGNORE_INDEX = -100  # a target with this id is not counted (a loss mask), as in `F.cross_entropy`
CHUNK_ROWS = 512  # rows of logits alive at once: 512 x 8192 fp32 = 16 MiB, which stays in the CPU's caches


class _LinearCrossEntropy(torch.autograd.Function):
    """`F.cross_entropy(hidden @ weight.T, targets)`, `chunk_rows` rows at a time, gradients computed on the way.

    Each chunk's logits `[chunk, vocab]` are turned in place into the chunk's gradient `softmax - onehot`, which
    is multiplied into the hidden-state and weight gradients at once; the `[N, vocab]` logits, their
    log-softmax and its gradient (four full-size tensors in the unfused step) never exist. The idea is the
    "fused linear cross entropy" of Liger Kernel (Hsu et al. 2024) and of Wijmans et al. 2024 ("Cut your
    losses in large-vocabulary language models").
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, ignore_index: int):
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        w = weight.to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty((n, hidden.shape[1]), dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        # oneDNN for the two products of the form x @ W^T (2x MKL's sgemm on the project's AMD EPYC); the
        # weight gradient's accumulation stays an in-place addmm_ (as fast either way, and no copies).
        onednn = hidden.device.type == "cpu" and dtype == torch.float32 and native.onednn_linear_available()
        w_t = w.t().contiguous() if onednn and need_h else None
        counted = targets != ignore_index
        count = int(counted.sum())
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows].to(dtype)
            t, keep = targets[start:start + chunk_rows], counted[start:start + chunk_rows]
            z = native.onednn_mm(h, w) if onednn else h @ w.t()  # [chunk, vocab] logits
            rows = torch.arange(len(t), device=z.device)
            target_logit = z[rows, t.clamp(min=0)]
            m = z.amax(dim=-1, keepdim=True)
            z.sub_(m).exp_()
            s = z.sum(dim=-1, keepdim=True)
            lse = (m + s.log()).squeeze(1)
            total += ((lse - target_logit) * keep).sum(dtype=torch.float64)
            if need_h or need_w:
                z.div_(s)  # softmax
                z[rows, t.clamp(min=0)] -= 1.0
                z.mul_((keep.to(dtype) / max(count, 1))[:, None])  # d(mean loss)/d(logits); uncounted rows 0
                if need_h and onednn:
                    grad_h[start:start + chunk_rows] = native.onednn_mm(z, w_t)
                elif need_h:
                    torch.mm(z, w, out=grad_h[start:start + chunk_rows])
                if need_w:
                    grad_w.addmm_(z.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        return (total / count).to(dtype) if count else torch.full((), float("nan"), dtype=dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else (grad_h * grad_loss).to(ctx.input_dtypes[0])
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.input_dtypes[1])
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_rows: int = CHUNK_ROWS, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of the logits `hidden @ weight.T` against `targets`, without the logits.

    `hidden` `[N, hidden]`, `weight` `[vocab, hidden]` (the LM head, tied or not), `targets` `[N]` int64 ids;
    a target equal to `ignore_index` is not counted. Returns a scalar equal (up to rounding) to
    `F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)`: NaN when no target counts.
    Computed in the promoted dtype of `hidden` and `weight` (float32 for a float32 head, also under bf16
    autocast, which is switched off inside), `chunk_rows` rows at a time. The gradients of `hidden` and `weight`
    are computed during the forward pass when autograd needs them (so a backward must follow, as in training);
    under `torch.no_grad()` only the loss is computed.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: need hidden [N, H], weight [V, H], targets [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, ignore_index)


def causal_lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                   chunk_rows: int = CHUNK_ROWS, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on `inputs` `[B, T]` against `targets` `[B, T]` (nats/token).

    Equals `F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten(), ignore_index=...)`. A model
    with `hidden_states(input_ids) -> [B, T, hidden]` and a bias-free `lm_head` (llmos's Llama and GPT-2) gets
    the fused, chunked head + loss (`linear_cross_entropy`); any other model (the LSTM) the plain computation.
    """
    head = getattr(model, "lm_head", None)
    if hasattr(model, "hidden_states") and isinstance(head, torch.nn.Linear) and head.bias is None:
        hidden = model.hidden_states(inputs)
        return linear_cross_entropy(hidden.flatten(0, 1), head.weight, targets.flatten(),
                                    chunk_rows=chunk_rows, ignore_index=ignore_index)
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def make_fused_adamw(param_groups: Iterable[dict], *, lr: float, betas: tuple[float, float], eps: float = 1e-8
                     ) -> torch.optim.AdamW:
    """`torch.optim.AdamW` (Loshchilov & Hutter 2019) with the fused kernel (one call per step for all
    parameters; CPU and CUDA), falling back to the multi-tensor (`foreach`) one where the fused kernel does not
    support the parameters' device or dtype. On CPU, `torch.optim.AdamW`'s default is the slowest variant, a
    Python loop over the parameters; the update is the same up to rounding."""
    groups = list(param_groups)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` the part of `model` that `causal_lm_loss` runs through autograd: its `hidden_states` (the
    transformer body, where compiling fuses the norms, RoPE, SwiGLU and residual adds), leaving the LM head + loss
    to `linear_cross_entropy`; a model without `hidden_states` is compiled whole. Returns the model to train (the
    same object, with a compiled `hidden_states`, or the compiled wrapper). The first step pays the compilation
    (tens of seconds on a CPU)."""
    if hasattr(model, "hidden_states"):
        model.hidden_states = torch.compile(model.hidden_states)
        return model
    return torch.compile(model)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems


def tune_allocator() -> bool:
    """Make glibc's malloc keep training's large tensors in the heap: allocations up to 32 MiB come from the heap
    instead of a fresh `mmap` each (and freed memory is not trimmed back to the system), so every step reuses the
    previous step's pages rather than page-faulting new zeroed ones. With `linear_cross_entropy` no tensor of a
    small model's step is larger than that; without it the step page-faults hundreds of MiB each time (measured
    on the 2-core EPYC: about 140,000 minor faults and 0.2 s of system time per step for transformers' Llama at
    batch 16 x 256, vocabulary 8192). Costs: the process's resident memory stays at its peak. Call once at the
    start of a training process (it changes the whole process). Returns False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**30))
