"""Optional native CPU kernels, compiled from `csrc/` with the system C compiler on first use.

Owns building, caching (under LLMOS_HOME/cache, default ~/.llmos/cache) and loading the shared
library through ctypes. Never required: with no compiler, or off the CPU, callers use the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.c"
# Not -ffast-math: linked into a shared library it sets flush-to-zero for the whole process that loads it
# (crtfastmath.o), changing every float computation there; these are the parts of it the kernels need.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
         "-freciprocal-math", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    return Path(os.environ.get("LLMOS_HOME") or "~/.llmos").expanduser() / "cache" / "native"


P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {  # the C functions of csrc/paged_attention.c: (return type, argument types)
    "paged_attention_rows": (None, [P] * 7 + [I64] * 6 + [F32, INT]),
    "linear_small_m": (None, [P] * 4 + [I64] * 3 + [INT]),
    "add_rms_norm": (None, [P] * 4 + [I64] * 2 + [F32, INT]),
    "rope_write_kv": (None, [P] * 9 + [I64] * 4 + [INT]),
    "gemm_panels_available": (INT, []),
    "pack_panels": (None, [P] * 2 + [I64] * 2),
    "gemm_panels": (None, [P] * 4 + [I64] * 3 + [INT]),
    "argmax_rows": (None, [P] + [I64] * 3 + [P, INT]),
    "silu_mul": (None, [P] * 2 + [I64] * 2 + [INT]),
}


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (no compiler, LLMOS_NATIVE=0)."""
    if os.environ.get("LLMOS_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = SOURCE.read_bytes()
    digest = hashlib.sha256(src + " ".join(FLAGS).encode() + cc.encode()).hexdigest()[:16]
    lib = _cache_dir() / f"paged_attention-{digest}.so"
    if not lib.is_file():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
            os.close(fd)
            subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)  # atomic: a concurrent or crashed build never leaves half a library
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError:
        return None
    for name, (restype, argtypes) in SIGNATURES.items():
        f = getattr(handle, name)
        f.restype, f.argtypes = restype, argtypes
    return handle


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the native attention kernel can run on these tensors (CPU, float32, contiguous cache)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and k_cache.is_contiguous() and library() is not None)


def paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         row_table: torch.Tensor, row_ctx: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each query row over its sequence's paged cache, read in place.

    `q` `[N, heads, head_dim]`; caches `[num_blocks, block_size, kv_heads, head_dim]` (the rows' own K/V
    already written); `block_tables` `[S, max_blocks]` int64; row r uses table `row_table[r]` and attends
    over its first `row_ctx[r]` tokens (position + 1); both `[N]` int64. Returns `[N, heads, head_dim]`.
    """
    q = q.contiguous()
    out = torch.empty_like(q)
    n, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    library().paged_attention_rows(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), row_table.data_ptr(),
        row_ctx.data_ptr(), out.data_ptr(), n, h, kvh, d, bs, block_tables.shape[1], scale, torch.get_num_threads())
    return out


# Rows up to which the one-pass kernel (linear_small_m) beats oneDNN (measured on the 2-core EPYC at 256-2048 wide layers:
# 1.3-2x at 4 rows, about even at 8 rows for inputs up to 1024 wide, slower beyond).
NATIVE_M = 4
NATIVE_M_NARROW = 8  # for inputs at most NARROW_K wide
NARROW_K = 1024


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` for `x` `[..., in]` with a few rows (`NATIVE_M`, `NATIVE_M_NARROW`), float32 CPU,
    no autograd.

    `weight` `[out, in]` contiguous. Returns `[..., out]`.
    """
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype)
    library().linear_small_m(x2.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                             x2.shape[0], x2.shape[1], weight.shape[0], torch.get_num_threads())
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- CPU linear dispatch ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether torch's oneDNN (MKL-DNN) linear primitive runs here, and gives what `F.linear` gives."""
    if os.environ.get("LLMOS_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        with torch.no_grad():
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


def bucket_rows(m: int) -> int:
    """The row count a `m`-row product is padded to for oneDNN: oneDNN builds (and caches) one primitive per
    shape, at 0.2-2 ms each, so a serving loop whose batch size changes every step would build new ones all
    the time; rounding up to multiples of 8 (to 64 rows), 32 (to 512) and 128 keeps the set small."""
    step = 8 if m <= 64 else 32 if m <= 512 else 128
    return -(-m // step) * step


PANEL_MAX_M = 64  # rows up to which the panel kernel beats oneDNN here (1.2-2x, measured at 4-64 rows)


def gemm_panels_available() -> bool:
    """Whether the AVX-512 panel kernel was built (the compiler targets AVX-512 on this machine)."""
    return library() is not None and bool(library().gemm_panels_available())


# Packed copies of weights (the panel kernel's layout where it is built, else oneDNN's blocked layout, which a
# plain weight is reordered to on every call, 20-40% of a decode-sized product). They are copies, so they are
# kept only up to this many bytes in all; past it the plain weight is used.
PACK_LIMIT_BYTES = int(float(os.environ.get("LLMOS_PACK_BYTES", 2 * 2**30)))
_packed_bytes = 0


class PackedWeight:
    """A packed copy of one `[out, in]` float32 weight for the CPU linear (`cpu_linear`), built on first use and
    rebuilt if the weight is modified in place (tracked through its version counter). `get(weight)` returns
    `(layout, tensor)` with layout "panels" (`gemm_panels`) or "onednn", or None past `PACK_LIMIT_BYTES`."""

    def __init__(self) -> None:
        self.packed: tuple[str, torch.Tensor] | None = None
        self.key: tuple | None = None
        self.refused = False
        self.nbytes = 0

    def __del__(self) -> None:  # a dropped model gives its share of the budget back
        global _packed_bytes
        _packed_bytes -= self.nbytes

    def get(self, weight: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        global _packed_bytes
        # An inference tensor has no version counter (and cannot change outside inference mode).
        key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version, tuple(weight.shape))
        if key == self.key:
            return self.packed
        if self.refused:
            return None
        nbytes = weight.numel() * weight.element_size()
        if self.packed is None and _packed_bytes + nbytes > PACK_LIMIT_BYTES:
            self.refused = True
            return None
        with torch.inference_mode(False), torch.no_grad():
            w = weight.detach().contiguous()
            if gemm_panels_available():
                n, k = w.shape
                panels = torch.empty(-(-n // 32) * 32 * k, dtype=torch.float32)
                library().pack_panels(w.data_ptr(), panels.data_ptr(), n, k)
                packed = ("panels", panels)
            elif onednn_linear_available():
                packed = ("onednn", torch.ops.mkldnn._reorder_linear_weight(w, 32))
            else:
                self.refused = True
                return None
        if self.packed is None:
            _packed_bytes += nbytes
            self.nbytes = nbytes
        self.packed, self.key = packed, key
        return packed


def gemm_panels(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """`x @ W.T + bias` for `x` `[M, in]` contiguous float32 and W packed by `PackedWeight` ("panels")."""
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    library().gemm_panels(x.data_ptr(), panels.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                          x.shape[0], x.shape[1], n, torch.get_num_threads())
    return y


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               packed: PackedWeight | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for float32 CPU inference (no autograd), by the fastest path here.

    `x` `[..., in]`, `weight` `[out, in]`, `bias` `[out]` or None; returns `[..., out]` float32. Paths, by rows:
    - up to `PANEL_MAX_M`, with the weight packed (`packed`) and the AVX-512 kernel built: `gemm_panels`;
    - a few rows otherwise: `linear_small_m` (one pass over the weight, at memory bandwidth);
    - more rows: oneDNN's matmul primitive (torch's MKL-DNN build; rows padded to `bucket_rows`), which on the
      project's AMD EPYC (AVX-512) runs at 2-2.5x the rate of the MKL sgemm that `F.linear` calls (measured:
      470 against 210 GFLOP/s at 512 rows), with the oneDNN-packed weight where the panel kernel is not built;
    - else `F.linear`.
    Results agree with `F.linear` to float32 rounding (summation order differs).
    """
    m, k = x.numel() // x.shape[-1], x.shape[-1]
    if m == 0:
        return torch.nn.functional.linear(x, weight, bias)
    pw = packed.get(weight) if packed is not None and library() is not None else None
    if pw is not None and pw[0] == "panels" and m <= PANEL_MAX_M:
        return gemm_panels(x.reshape(m, k).contiguous(), pw[1], bias, weight.shape[0]).view(*x.shape[:-1], -1)
    if m <= (NATIVE_M_NARROW if k <= NARROW_K else NATIVE_M) and weight.is_contiguous() and library() is not None:
        return linear_small_m(x, weight, bias)
    if not onednn_linear_available():
        return torch.nn.functional.linear(x, weight, bias)
    x2 = x.reshape(m, k)
    mp = bucket_rows(m)
    if mp != m:
        padded = x2.new_empty(mp, k)
        padded[:m] = x2
        padded[m:] = 0
        x2 = padded
    w = pw[1] if pw is not None and pw[0] == "onednn" else weight
    y = torch.ops.mkldnn._linear_pointwise(x2, w, bias, "none", [], "")
    return y[:m].view(*x.shape[:-1], weight.shape[0])


# ---- Training: the same oneDNN matmul under autograd --------------------------------------------------------


@torch.library.custom_op("llmos::onednn_mm", mutates_args=())
def _onednn_mm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")


@_onednn_mm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def onednn_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` through oneDNN for `x` `[M, K]`, `weight` `[N, K]` (float32 CPU); `[M, N]`.
    A custom op (`llmos::onednn_mm`), so that `torch.compile` keeps it as one opaque call."""
    return _onednn_mm_op(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` with oneDNN matmuls in the forward pass and both gradients (dx = g W, dW = g^T x), which on
    the project's AMD EPYC run at 2-3x MKL's sgemm (measured at training shapes, 4096 x 256 x 768: 8 against
    25 ms)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        return onednn_mm(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_mm(g, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            gw = onednn_mm(g.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def training_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` under autograd through oneDNN when it applies (float32 CPU tensors, plain
    tensors (not DTensor shards), no autocast, oneDNN available); else None. Inside `torch.compile` the matmuls
    stay opaque custom-op calls and inductor fuses what is around them."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(weight) in (torch.Tensor, torch.nn.Parameter) and type(x) is torch.Tensor
            and not torch.is_autocast_enabled("cpu") and x.numel() > 0 and onednn_linear_available()):
        return None
    return _OneDNNLinear.apply(x, weight, bias)


# ---- Fused elementwise steps of a Llama layer (float32 CPU, contiguous, no autograd) ---------------------------


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Residual add and RMSNorm in one pass: `x += h` in place (when `h` is given), then returns
    `x * rsqrt(mean(x^2) + eps) * weight`. `x`, `h` `[M, hidden]` contiguous; `weight` `[hidden]`."""
    out = torch.empty_like(x)
    library().add_rms_norm(x.data_ptr(), 0 if h is None else h.data_ptr(), weight.data_ptr(), out.data_ptr(),
                           x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary embedding of the fused projection and the K/V write into the paged cache, in one pass.

    `qkv` `[N, (heads + 2 kv_heads) * head_dim]` contiguous (q, k, v heads in that order); `cos`/`sin`
    `[N, head_dim / 2]`; `slot_mapping` `[N]` int64; caches `[num_blocks, block_size, kv_heads, head_dim]`
    contiguous. Returns rotated q `[N, heads, head_dim]`, rotated k and v `[N, kv_heads, head_dim]`.
    """
    n = qkv.shape[0]
    q = qkv.new_empty(n, num_heads, head_dim)
    k = qkv.new_empty(n, num_kv_heads, head_dim)
    v = qkv.new_empty(n, num_kv_heads, head_dim)
    library().rope_write_kv(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slot_mapping.data_ptr(), q.data_ptr(),
                            k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), n, num_heads,
                            num_kv_heads, head_dim, torch.get_num_threads())
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: `silu(gate_up[:, :I]) * gate_up[:, I:]` for the fused gate/up projection `[M, 2 I]`
    (contiguous). Returns `[M, I]`."""
    m, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(m, inter)
    library().silu_mul(gate_up.data_ptr(), out.data_ptr(), m, inter, torch.get_num_threads())
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` for float32 CPU logits `[M, vocab]` (rows may be strided, columns contiguous):
    the first maximum of each row, or its first NaN, as torch returns. Returns `[M]` int64."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] == 0
            or library() is None):
        return x.argmax(dim=-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), torch.get_num_threads())
    return out
