"""The native paged decode kernel against the torch gather + SDPA path (the oracle)."""

import random

import pytest
import torch

from llmos.model import native
from llmos.model.attention import AttentionMetadata, Segment, paged_attention


@pytest.mark.skipif(native.library() is None, reason="no C compiler on this machine: the torch path is used")
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 4, 16, 4), (8, 2, 64, 16), (12, 12, 64, 16)])
def test_native_decode_matches_torch_path(heads, kv_heads, head_dim, block_size):
    rng = random.Random(heads * 100 + head_dim)
    torch.manual_seed(head_dim)
    num_blocks = 64
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    vc = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    lens = [rng.randint(1, 8 * block_size) for _ in range(7)]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    q = torch.randn(len(lens), heads, head_dim)
    k = torch.randn(len(lens), kv_heads, head_dim)
    v = torch.randn(len(lens), kv_heads, head_dim)
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size for t, n in zip(tables, lens)])
    segments = [Segment(i, 1, n, torch.tensor(t)) for i, (t, n) in enumerate(zip(tables, lens))]
    scale = head_dim ** -0.5
    ref = paged_attention(q, k, v, kc.clone(), vc.clone(), AttentionMetadata(slots, segments), scale)
    meta = AttentionMetadata(slots, segments).with_decode_tables(tables, lens)
    got = paged_attention(q, k, v, kc, vc, meta, scale)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(native.library() is None, reason="no C compiler on this machine: the torch path is used")
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
def test_linear_small_m_matches_torch(rows):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 96), torch.randn(200, 96), torch.randn(200)
    torch.testing.assert_close(native.linear_small_m(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(native.linear_small_m(x[None], w, None), (x @ w.t())[None], atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(native.library() is None, reason="no C compiler on this machine: the torch path is used")
def test_loading_the_kernels_leaves_the_process_floating_point_mode_alone():
    """-ffast-math would link crtfastmath.o, which turns on flush-to-zero for the whole process that loads the
    library: subnormal floats would become 0 everywhere (hypothesis refuses to run in such a process)."""
    import torch

    tiny = float.fromhex("0x1p-1060")  # a subnormal double
    assert tiny * 1.5 != 0.0
    assert torch.tensor([1e-40], dtype=torch.float32).mul(1.5).item() != 0.0
