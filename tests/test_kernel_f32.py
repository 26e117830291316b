"""The native float32 kernel (csrc/qgemm_f32.h, AVX2): low-bit copies of float32 weights only where
they are exact (a Q4_0/Q4_1 or Q8_0 GGUF's weights), results as close to float32's matmul as a
float32 sum in another order, and each row bit for bit the same whatever the number of rows beside
it (its 1-, few- and many-row paths differ). On every x86 CPU of this project: all have AVX2."""

from __future__ import annotations

import pytest
import torch

from fundament.models.llama import INT4_GROUP, Linear
from fundament.models.llama import linear as L
from fundament.models.llama.linear import PACK_INT4, PACK_INT8, PACK_INT8G, pack_weight

ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 17, 33, 64)
OUT, IN = 1520, 576  # 95 panels of 16: 23 blocks of 4 and a last block of 3


def f32_available() -> bool:
    from fundament.models import native

    return native.load() and bool(torch.ops.fundament.qgemm_f32_available())


pytestmark = pytest.mark.skipif(not f32_available(), reason="the native build has no AVX2 float32 kernel here")


def q4_weight() -> torch.Tensor:
    """As a Q4_1 GGUF's: levels 0..15 per group of 32, a float16 scale and minimum per group."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (OUT, IN // INT4_GROUP, INT4_GROUP), generator=g).float()
    levels[..., 0], levels[..., 1] = 0, 15
    scale = (torch.rand(OUT, IN // INT4_GROUP, 1, generator=g) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(OUT, IN // INT4_GROUP, 1, generator=g) * 0.08).half().float()
    return (levels * scale + low).view(OUT, IN)


def q8_weight() -> torch.Tensor:
    """As a Q8_0 GGUF's: int8 levels, a float16 scale per group of 32, the largest magnitude 127."""
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(-127, 128, (OUT, IN // INT4_GROUP, INT4_GROUP), generator=g).float()
    levels[..., 3] = -127
    scale = (torch.rand(OUT, IN // INT4_GROUP, 1, generator=g) * 0.001 + 1e-4).half().float()
    return (levels * scale).view(OUT, IN)


def packed(w: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    return Linear(w.clone(), bias, int8=True, source=w.clone(), pack=True)


def int8x(w: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    return Linear(w.clone(), bias, int8=True, source=w.clone(), pack=True, int8x=True)


def test_exact_weights_are_packed_and_others_are_not():
    assert packed(q4_weight()).packed[0] == PACK_INT4
    assert packed(q8_weight()).packed[0] == PACK_INT8G
    noisy = torch.randn(OUT, IN) * 0.05  # no low-bit form holds it exactly: the float32 weight stays
    lin = packed(noisy)
    assert lin.packed is None and torch.equal(lin.weight, noisy)
    # int4 to within a thousandth of a step (a K-quant's scales are not float16): bf16 would take
    # it, float32 must not
    close = q4_weight() * (1 + 1e-5)
    assert L._int4_levels(close) is not None
    assert packed(close).packed is None
    assert Linear(q4_weight(), int8=True, source=q4_weight(), pack=False).packed is None


@pytest.mark.parametrize("make", [q4_weight, q8_weight], ids=["int4", "int8g"])
def test_dequantized_weights_are_the_float32_ones(make):
    """x = I gives the weights back: every one equal to the float32 weight it replaced."""
    w = make()
    lin = packed(w)
    got = lin(torch.eye(IN), n_decode=IN).t()
    assert torch.equal(got, w)


@pytest.mark.parametrize("make", [q4_weight, q8_weight], ids=["int4", "int8g"])
def test_close_to_float32_matmul(make):
    w = make()
    bias = torch.randn(OUT)
    x = torch.randn(40, IN)
    y = packed(w, bias)(x, n_decode=40)
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    assert (y.double() - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("rows", ["float32", "int8"])
@pytest.mark.parametrize("make", [q4_weight, q8_weight], ids=["int4", "int8g"])
def test_rows_are_batch_invariant(make, rows):
    """Float32 rows, and int8 rows (engine.int8_activations): each row bit for bit the same alone
    and beside 1 to 63 others."""
    lin = (packed if rows == "float32" else int8x)(make(), torch.randn(OUT))
    x = torch.randn(max(ROWS), IN)
    i8 = rows == "int8"
    alone = torch.cat([lin(x[i : i + 1], n_decode=1, n_int8=int(i8)) for i in range(max(ROWS))])
    for n in ROWS:
        assert torch.equal(lin(x[:n], n_decode=n, n_int8=n if i8 else 0), alone[:n]), f"{n} rows"


def test_int8_rows_on_amx_integer_tiles_are_the_vector_units_bits():
    """Where the CPU has AMX-INT8, int8 rows times int4 weights from 2 rows take the integer tiles
    (csrc/qgemm_i8_amx.h: exact int32 sums per group, then the vector path's float steps in its
    order), so every row count gives the bits the vector units give, and a row the bits it has
    alone: the kernel's choice by number of rows cannot change a request's tokens."""
    from fundament.models.device import cpu_flags

    if "amx_int8" not in cpu_flags():
        pytest.skip("no AMX-INT8 on this CPU")
    op = torch.ops.fundament.qgemm_amx
    before = op()
    lin = int8x(q4_weight(), torch.randn(OUT))
    x = torch.randn(70, IN) * (1 + 10 * torch.rand(70, 1))  # rows of different scales
    x[5, 32:96] = 0  # all-zero groups
    try:
        got = {}
        for tiles in (0, 1):
            assert op(tiles) is bool(tiles)
            got[tiles] = {n: lin(x[:n], n_decode=n, n_int8=n) for n in (*ROWS, 70)}
        alone = torch.cat([lin(x[i : i + 1], n_decode=1, n_int8=1) for i in range(70)])
    finally:
        op(int(before))
    for n in (*ROWS, 70):
        assert torch.equal(got[1][n], got[0][n]), f"{n} rows: tiles != vector units"
        assert torch.equal(got[1][n], alone[:n]), f"{n} rows: a row != alone"


def test_every_kind_of_the_layout():
    """The other kinds qgemm.h's layout has (bf16, int8 with column scales) read right too."""
    w = (torch.randn(OUT, IN) * 0.05).to(torch.bfloat16)
    x = torch.randn(9, IN)
    none = torch.empty(0)
    bf16 = torch.ops.fundament.qgemm(x, 0, pack_weight(0, w), none, none, True)
    ref = x.double() @ w.double().t()
    assert (bf16 - ref).abs().max() < 1e-5 * ref.abs().max()
    q = torch.randint(-127, 128, (OUT, IN), dtype=torch.int8)
    s = torch.rand(OUT) * 0.01
    i8 = torch.ops.fundament.qgemm(x, PACK_INT8, pack_weight(PACK_INT8, q), s, none, True)
    ref = (x.double() @ q.double().t()) * s.double()
    assert (i8 - ref).abs().max() < 1e-5 * ref.abs().max()


def test_float32_model_takes_exact_copies_only():
    """A float32 LlamaModel on the default GGUF: int4 layers and an int8g head, every row through
    the kernel, and the same greedy tokens as its float32 weights."""
    from fundament.config import DEFAULT_MODELS
    from fundament.models.llama import LlamaModel, Segment
    from fundament.models.loading import hf_dir_for

    d = hf_dir_for(DEFAULT_MODELS[0])
    low = LlamaModel.from_dir(d, dtype=torch.float32, int8_decode=True)
    full = LlamaModel.from_dir(d, dtype=torch.float32, int8_decode=False)
    assert {layer[n].packed[0] for layer in low.layers for n in low.LORA_TARGETS} == {PACK_INT4}
    assert low.lm_head.packed[0] == PACK_INT8G and low.rows_alone
    assert full.lm_head.packed is None
    ids = torch.tensor([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 2])
    n = len(ids)
    a = low.forward(ids, [Segment(low.new_cache(64), 0, n)], torch.arange(n))
    b = full.forward(ids, [Segment(full.new_cache(64), 0, n)], torch.arange(n))
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row as engine.int8_activations takes it: per 32 inputs d = max |x| / 127 and q =
    round(x / d), given back as q * d in float64 (what the integer dot products multiply)."""
    g = x.view(x.shape[0], -1, INT4_GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    q = torch.round(g * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q.double() * (amax / 127).double()).view_as(x)


@pytest.mark.parametrize("make", [q4_weight, q8_weight], ids=["int4", "int8g"])
def test_int8_activations_compute_the_quantized_rows_product(make):
    """engine.int8_activations: the kernel's result is the product of the weights with the rows
    quantized to int8 per group (exact integer sums; float32 rounding only in the per-group
    scaling), which is within a few thousandths of the float32 product."""
    w, bias = make(), torch.randn(OUT)
    x = torch.randn(40, IN)
    x[3, :64] = 0  # an all-zero group: scale 0, no division by it
    lin = int8x(w, bias)
    assert lin.int8x and lin.packed[0] == packed(w).packed[0]
    y = lin(x, n_decode=40, n_int8=40).double()
    want = torch.nn.functional.linear(quantized_rows(x), w.double(), bias.double())
    assert (y - want).abs().max() < 1e-5 * want.abs().max()
    exact = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    err = (y - exact).norm() / exact.norm()
    assert 1e-4 < err < 1e-2  # quantized (not float32 rows), and close
    # only the rows named: the first 7 as int8 rows, the rest exactly as without int8x
    mixed = lin(x, n_decode=40, n_int8=7)
    assert torch.equal(mixed[:7], y[:7].float()) and torch.equal(mixed[7:], packed(w, bias)(x[7:], n_decode=33))


def test_a_float32_model_multiplies_generated_tokens_as_int8_rows():
    """engine.int8_activations (the default): the registry's float32 model of the default GGUF
    multiplies the rows of generated tokens (segments marked `generated`) as int8 copies in every
    layer and the head, and a prompt's rows in float32, bit for bit as without int8 rows, so
    classifications and prompt logprobs keep float32's scores. The int8 rows' logits stay close
    and pick the same tokens where the choice is clear (perplexity: bench_quality.py)."""
    from fundament.config import DEFAULT_MODELS, EngineConfig
    from fundament.models.llama import Segment
    from fundament.models.loading import hf_dir_for
    from fundament.registry import load_weights

    d = hf_dir_for(DEFAULT_MODELS[0])
    fast = load_weights("smol", d, EngineConfig(dtype="float32"))
    exact = load_weights("smol", d, EngineConfig(dtype="float32", int8_activations=False))
    assert fast.int8_rows and not exact.int8_rows
    assert all(layer[n].int8x and layer[n].packed[0] == PACK_INT4 for layer in fast.layers for n in fast.LORA_TARGETS)
    assert fast.lm_head.int8x and fast.lm_head.packed[0] == PACK_INT8G
    ids = torch.tensor([1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 2, 198, 1, 4093, 198])
    n = len(ids)

    def run(model, generated):  # the prompt's first token in one segment, then one token at a time
        cache = model.new_cache(64)
        rows = [model.forward(ids[:1], [Segment(cache, 0, 1)], torch.tensor([0]))]
        for i in range(1, n):
            seg = Segment(cache, i, 1, generated=generated)
            rows.append(model.forward(ids[i : i + 1], [seg], torch.tensor([0])))
        return torch.cat(rows)

    b = exact.forward(ids, [Segment(exact.new_cache(64), 0, n)], torch.arange(n))
    assert torch.equal(fast.forward(ids, [Segment(fast.new_cache(64), 0, n)], torch.arange(n)), b)
    assert torch.equal(run(fast, generated=False), b)  # prompt rows, one at a time: float32 too
    assert torch.equal(run(exact, generated=True), b)  # without int8 rows the flag changes nothing
    a = run(fast, generated=True)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.mean() > 0.99 and cos.min() > 0.95  # measured 0.997 and 0.972
    # the prompt's row as float32's, every generated row through int8 rows (not float32's), and close
    assert torch.equal(a[0], b[0]) and (a[1:] != b[1:]).any(-1).all() and (a - b).abs().max() < 0.1 * b.abs().max()
    top = b.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) >= 1.0
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
