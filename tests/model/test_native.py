"""The native CPU kernels against their PyTorch formulas: paged attention against the torch gather + SDPA path
(the oracle), the fused Llama-layer steps, and the CPU linear dispatch against `F.linear`."""

import random

import pytest
import torch

from llmos.model import native
from llmos.model.attention import AttentionMetadata, Segment, paged_attention


needs_cc = pytest.mark.skipif(native.library() is None, reason="no C compiler on this machine: the torch path is used")


def _batch(rng, lens, new, block_size, num_blocks, kv_heads, head_dim):
    """Sequences of `lens` tokens whose last `new[i]` are this step's rows: caches holding their older tokens,
    block tables, slots, segments."""
    kc = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    vc = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    slots, positions, segments, row = [], [], [], 0
    for t, n, m in zip(tables, lens, new):
        for pos in range(n - m, n):
            slots.append(t[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
        segments.append(Segment(row, m, n, torch.tensor(t)))
        row += m
    return kc, vc, torch.tensor(slots), torch.tensor(positions), segments


@needs_cc
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 4, 16, 4), (8, 2, 64, 16), (12, 12, 64, 16),
                                                                (8, 4, 32, 16), (2, 1, 128, 8)])
def test_native_decode_matches_torch_path(heads, kv_heads, head_dim, block_size):
    rng = random.Random(heads * 100 + head_dim)
    torch.manual_seed(head_dim)
    lens = [rng.randint(1, 8 * block_size) for _ in range(7)]
    kc, vc, slots, positions, segments = _batch(rng, lens, [1] * len(lens), block_size, 64, kv_heads, head_dim)
    q = torch.randn(len(lens), heads, head_dim)
    k = torch.randn(len(lens), kv_heads, head_dim)
    v = torch.randn(len(lens), kv_heads, head_dim)
    scale = head_dim ** -0.5
    ref = paged_attention(q, k, v, kc.clone(), vc.clone(), AttentionMetadata(slots, segments), scale)
    meta = AttentionMetadata(slots, segments).with_row_tables(positions)
    got = paged_attention(q, k, v, kc, vc, meta, scale)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(4, 2, 16, 4), (8, 4, 32, 16), (6, 6, 48, 16)])
def test_native_mixed_batch_matches_torch_path(heads, kv_heads, head_dim, block_size):
    """Decode rows, whole prompts (nothing cached before them) and later prefill chunks (a cached prefix) in
    one batch: every row attends causally, as the torch path (SDPA per segment) computes it."""
    rng = random.Random(heads + head_dim)
    torch.manual_seed(heads)
    lens = [37, 5, 64, 90, 1, 23]
    new = [1, 5, 64, 17, 1, 9]  # decode, whole prompt, whole prompt, chunk after 73 cached, decode, chunk
    kc, vc, slots, positions, segments = _batch(rng, lens, new, block_size, 128, kv_heads, head_dim)
    n = sum(new)
    q, k, v = torch.randn(n, heads, head_dim), torch.randn(n, kv_heads, head_dim), torch.randn(n, kv_heads, head_dim)
    scale = head_dim ** -0.5
    ref = paged_attention(q, k, v, kc.clone(), vc.clone(), AttentionMetadata(slots, segments), scale)
    meta = AttentionMetadata(slots, segments).with_row_tables(positions)
    assert meta.row_table is not None
    got = paged_attention(q, k, v, kc, vc, meta, scale)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("rows", [1, 5, 32, 300])
def test_fused_elementwise_kernels_match_torch(rows):
    """Residual + RMSNorm, rotary + K/V write, and SwiGLU's gate against their PyTorch formulas."""
    from llmos.model.transformer import apply_rope

    torch.manual_seed(rows)
    x, h, w = torch.randn(rows, 64), torch.randn(rows, 64), torch.randn(64)
    x0 = x.clone()
    got = native.add_rms_norm(x, h, w, 1e-5)
    torch.testing.assert_close(x, x0 + h)
    torch.testing.assert_close(got, torch.nn.functional.rms_norm(x0 + h, (64,), w, 1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native.add_rms_norm(x0.clone(), None, w, 1e-5),
                               torch.nn.functional.rms_norm(x0, (64,), w, 1e-5), atol=1e-5, rtol=1e-5)

    heads, kv_heads, d = 4, 2, 16
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d)
    freqs = torch.arange(rows, dtype=torch.float32)[:, None] * (10000.0 ** (-torch.arange(0, d, 2) / d))
    slots = torch.randperm(rows + 7)[:rows]
    kc, vc = torch.zeros(rows + 7, 1, kv_heads, d), torch.zeros(rows + 7, 1, kv_heads, d)
    q, k, v = native.rope_write_kv(qkv, freqs.cos(), freqs.sin(), slots, kc, vc, heads, kv_heads, d)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    rq, rk, rv = qkv.view(rows, -1, d).split([heads, kv_heads, kv_heads], dim=1)
    torch.testing.assert_close(q, apply_rope(rq, emb.cos(), emb.sin()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, apply_rope(rk, emb.cos(), emb.sin()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(kc[slots, 0], k)
    torch.testing.assert_close(vc[slots, 0], v)

    gu = torch.randn(rows, 2 * 48) * 8  # wide range: e^-x near both ends of float32
    gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-3])
    torch.testing.assert_close(native.silu_mul(gu), torch.nn.functional.silu(gu[:, :48]) * gu[:, 48:],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 8, 9, 17, 64, 65, 513])
def test_cpu_linear_matches_f_linear(rows):
    """Every path of the CPU linear (one-pass kernel, oneDNN with padded rows, plain or prepacked weight)."""
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 96), torch.randn(200, 96), torch.randn(200)
    ref = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(native.cpu_linear(x, w, b), ref, atol=1e-4, rtol=1e-5)
    packed = native.PackedWeight()
    torch.testing.assert_close(native.cpu_linear(x, w, b, packed), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(native.cpu_linear(x[None], w, None, packed), (x @ w.t())[None], atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        w.mul_(2)  # an in-place change: the packed copy is rebuilt
    torch.testing.assert_close(native.cpu_linear(x, w, b, packed), torch.nn.functional.linear(x, w, b),
                               atol=1e-4, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 16])
def test_linear_small_m_matches_torch(rows):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 96), torch.randn(200, 96), torch.randn(200)
    torch.testing.assert_close(native.linear_small_m(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(native.linear_small_m(x[None], w, None), (x @ w.t())[None], atol=1e-4, rtol=1e-5)


@needs_cc
def test_loading_the_kernels_leaves_the_process_floating_point_mode_alone():
    """-ffast-math would link crtfastmath.o, which turns on flush-to-zero for the whole process that loads the
    library: subnormal floats would become 0 everywhere (hypothesis refuses to run in such a process)."""
    import torch

    tiny = float.fromhex("0x1p-1060")  # a subnormal double
    assert tiny * 1.5 != 0.0
    assert torch.tensor([1e-40], dtype=torch.float32).mul(1.5).item() != 0.0


def test_cpu_linear_with_inference_mode_weights():
    """Weights created under inference mode (no version counter) can be prepacked too."""
    with torch.inference_mode():
        x, w = torch.randn(40, 32), torch.randn(24, 32)
        torch.testing.assert_close(native.cpu_linear(x, w, None, native.PackedWeight()), x @ w.t(),
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 7), (32, 8192), (5, 40000)])
def test_argmax_rows_matches_torch(rows, vocab):
    """First maximum per row (ties), and a NaN wins as in torch; strided rows too."""
    torch.manual_seed(vocab)
    x = torch.randn(rows, vocab + 3)[:, :vocab]  # strided rows
    x[0, vocab // 2:] = x[0].max()  # a tie: the first one counts
    if rows > 2:
        x[2, vocab - 1] = float("nan")
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
    x[:, :] = float("-inf")
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.parametrize("rows", [3, 40, 100])
def test_cpu_linear_onednn_packing_where_the_panel_kernel_is_not_built(rows, monkeypatch):
    """Machines without AVX-512 pack weights for oneDNN instead: same results."""
    monkeypatch.setattr(native, "gemm_panels_available", lambda: False)
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 64), torch.randn(72, 64), torch.randn(72)
    packed = native.PackedWeight()
    torch.testing.assert_close(native.cpu_linear(x, w, b, packed), torch.nn.functional.linear(x, w, b),
                               atol=1e-4, rtol=1e-5)
    assert packed.packed is None or packed.packed[0] == "onednn"


def test_packed_copies_respect_the_budget_and_give_it_back(monkeypatch):
    """Past LLMOS_PACK_BYTES a weight stays unpacked (still correct); a dropped copy frees its share."""
    import gc

    w = torch.randn(64, 32)
    monkeypatch.setattr(native, "PACK_LIMIT_BYTES", native._packed_bytes + w.numel() * 4)
    first, second = native.PackedWeight(), native.PackedWeight()
    assert first.get(w) is not None
    assert second.get(w) is None  # over the budget
    x = torch.randn(20, 32)
    torch.testing.assert_close(native.cpu_linear(x, w, None, second), x @ w.t(), atol=1e-4, rtol=1e-5)
    del first
    gc.collect()
    assert native.PackedWeight().get(w) is not None


def test_a_model_the_kernel_did_not_prepare_reads_its_live_weights():
    """Outside the kernel (evaluation, merging LoRA adapters) weights change through `.data`, which no version
    counter sees: such a module must not keep a packed copy."""
    from llmos.model.transformer import Linear

    torch.manual_seed(0)
    lin, x = Linear(32, 48), torch.randn(40, 32)
    with torch.no_grad():
        lin(x)
        lin.weight.data += 1.0
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_training_linear_gradients_match_f_linear(bias):
    """The oneDNN matmul under autograd: output and the three gradients as `F.linear` gives them."""
    torch.manual_seed(1)
    x = torch.randn(3, 70, 96, requires_grad=True)
    w = torch.randn(130, 96, requires_grad=True)
    b = torch.randn(130, requires_grad=True) if bias else None
    y = native.training_linear(x, w, b)
    if y is None:
        pytest.skip("oneDNN is not available in this torch build")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g)
    ref_y = torch.nn.functional.linear(x, w, b)
    ref = torch.autograd.grad(ref_y, [x, w] + ([b] if bias else []), g)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-5)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=1e-3, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native.training_linear(x, w, b) is None  # autocast keeps F.linear (and its bf16 cast)
