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
    f = handle.paged_decode_attention
    f.restype = None
    f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
    g = handle.linear_small_m
    g.restype = None
    g.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return handle


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the native decode kernel can run on these tensors (CPU, float32, head_dim <= 256)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and k_cache.is_contiguous() and library() is not None)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention over the paged cache, read in place.

    `q` `[S, heads, head_dim]`; caches `[num_blocks, block_size, kv_heads, head_dim]`;
    `block_tables` `[S, max_blocks]` int64; `context_lens` `[S]` int64. Returns `[S, heads, head_dim]`.
    """
    q = q.contiguous()
    out = torch.empty_like(q)
    S, H, D = q.shape
    _, bs, kvh, _ = k_cache.shape
    library().paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), S, H, kvh, D, bs, block_tables.shape[1], scale, torch.get_num_threads())
    return out


SMALL_M = 16  # rows up to which linear_small_m beats BLAS sgemm on the CPU (1.4-3x, measured at hidden 768)


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` for `x` `[..., in]` with at most `SMALL_M` rows, float32 CPU, no autograd.

    `weight` `[out, in]` contiguous. Returns `[..., out]`.
    """
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=x.dtype)
    library().linear_small_m(x2.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                             x2.shape[0], x2.shape[1], weight.shape[0], torch.get_num_threads())
    return y.view(*x.shape[:-1], weight.shape[0])
