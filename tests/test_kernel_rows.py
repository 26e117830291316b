"""The decode kernels compute each row alone: a row's result is bit for bit the same whatever the
number of rows beside it. The engine's batch invariance rests on this for decode rows (prompt rows
get matmuls of their own instead); if a CPU's kernels ever break it, this says so directly. Both
kernels: torch's int4/int8 ones, and the native build's own (csrc/qgemm.h, AVX512-BF16), which
takes other paths at 1-3, 4-6 and more rows and must still give each row the same bits; where the
CPU has AMX, the native kernel's tile path (csrc/qgemm_amx.h, one tile of up to 16 rows or tiles of
16 and a padded last one) is tested as well as its vector path."""

from __future__ import annotations

import pytest
import torch

from fundament.models.device import cpu_flags
from fundament.models.llama import INT4_GROUP, Linear
from fundament.models.llama.linear import PACK_BF16, PACK_INT4, PACK_INT8, pack_weight

ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 17, 33, 64)


def qgemm_available() -> bool:
    from fundament.models import native

    return native.load() and bool(torch.ops.fundament.qgemm_available())


def cpu_features() -> str:
    found = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in cpu_flags()]
    return ", ".join(found) or "none of avx512_bf16/amx"


def amx_available() -> bool:
    return qgemm_available() and "amx_bf16" in cpu_flags()


@pytest.fixture(params=["vector", "amx"])
def unit(request):
    """The native kernel's units for the test: AVX512-BF16's dot products, or AMX's tiles (where
    the CPU has them; the default there). Put back as it was after."""
    if not qgemm_available():
        yield request.param
        return
    op = torch.ops.fundament.qgemm_amx
    if request.param == "amx" and not amx_available():
        assert op(1) is False  # never on where the CPU or the kernel lacks the tiles
        pytest.skip("no AMX on this CPU")
    before = op()
    try:
        assert op(int(request.param == "amx")) is (request.param == "amx")
        yield request.param
    finally:
        op(int(before))


# 1,520 outputs: 95 panels of 16, so 23 blocks of 4 and a last block of 3.
OUT, IN = 1520, 576


def int4_source() -> torch.Tensor:
    torch.manual_seed(0)
    levels = torch.randint(0, 16, (OUT, IN)).float()  # exactly representable in int4 groups: the q4 path
    levels[:, 0::INT4_GROUP], levels[:, 1::INT4_GROUP] = 0, 15  # each group spans every level, as a Q4 GGUF's do
    scale = torch.rand(OUT, IN // INT4_GROUP).repeat_interleave(INT4_GROUP, 1) * 0.01
    return (levels - 8) * scale


@pytest.fixture(scope="module", params=["torch", "packed"])
def weights(request):
    pack = request.param == "packed"
    if pack and not qgemm_available():
        pytest.skip("the native build has no AVX512-BF16 kernel on this CPU")
    if not pack and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("no int4 kernel in this torch")
    int4 = int4_source()
    int8 = torch.randn(OUT, IN) * 0.05
    bias = torch.randn(OUT).to(torch.bfloat16)
    return {
        "int4": Linear(int4.to(torch.bfloat16), int8=True, source=int4, pack=pack),
        "int4+bias": Linear(int4.to(torch.bfloat16), bias, int8=True, source=int4, pack=pack),
        "int8": Linear(int8.to(torch.bfloat16), int8=True, source=int8 + 1e-3, pack=pack),
    }


@pytest.mark.parametrize("kind", ["int4", "int4+bias", "int8"])
def test_a_decode_row_is_computed_alone_whatever_the_batch(weights, kind, unit):
    lin = weights[kind]
    if lin.packed is None and unit == "amx":
        pytest.skip("torch's kernels: no unit to choose")
    if lin.packed is not None:
        assert lin.packed[0] == (PACK_INT8 if kind == "int8" else PACK_INT4)
    else:
        assert (lin.q4 is not None) == kind.startswith("int4") and (lin.q8 is not None) == (kind == "int8")
    torch.manual_seed(1)
    x = torch.randn(max(ROWS), 576).to(torch.bfloat16)
    alone = torch.cat([lin(x[i : i + 1], n_decode=1) for i in range(max(ROWS))])
    for m in ROWS:
        together = lin(x[:m], n_decode=m)
        assert torch.equal(together, alone[:m]), (
            f"{kind}: rows computed {m} at a time differ from alone ({unit}; CPU: {cpu_features()})"
        )


@pytest.mark.skipif(not qgemm_available(), reason="the native build has no AVX512-BF16 kernel on this CPU")
@pytest.mark.parametrize("rows", [1, 3, 5, 16, 64])
def test_the_packed_kernel_computes_x_w_transposed(rows, unit):
    """Against float32 arithmetic on the same weights: int4 and bf16 weights are exact in the
    kernel, so the error is the bf16 inputs' and output's rounding; int8 is the int8 copy's."""
    from fundament.models import native

    assert native.load()
    torch.manual_seed(2)
    x = torch.randn(rows, IN).to(torch.bfloat16)
    w4 = int4_source()
    bias = torch.randn(OUT)
    lin = Linear(w4.to(torch.bfloat16), bias.to(torch.bfloat16), int8=True, source=w4, pack=True)
    want = x.float() @ w4.t() + bias.to(torch.bfloat16).float()
    got = lin(x, n_decode=rows).float()
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    w8 = torch.randn(OUT, IN) * 0.05
    lin8 = Linear(w8.to(torch.bfloat16), int8=True, pack=True)
    assert lin8.packed is not None and lin8.packed[0] == PACK_INT8
    want8 = x.float() @ w8.to(torch.bfloat16).float().t()
    assert (lin8(x, n_decode=rows).float() - want8).abs().max() <= 2e-2 * want8.abs().max()
    # Prompt rows never take int8: the bf16 weight serves them, while the decode rows in front
    # of them keep the int8 copy.
    wb = w8.to(torch.bfloat16)
    mixed, half = lin8(x, n_decode=rows // 2), rows // 2
    bf16 = torch.nn.functional.linear(x, wb)
    assert torch.equal(mixed[half:], torch.nn.functional.linear(x[half:], wb))
    if half:
        assert torch.equal(mixed[:half], lin8(x[:half], n_decode=half))
        assert not torch.equal(mixed[:half], bf16[:half])
    # bf16 weights (no low-bit copy), and float32 out: the op itself
    got_b = torch.ops.fundament.qgemm(x, PACK_BF16, pack_weight(PACK_BF16, wb), torch.empty(0), torch.empty(0), True)
    assert got_b.dtype == torch.float32
    assert (got_b - x.float() @ wb.float().t()).abs().max() <= 1e-4 * got_b.abs().max()


@pytest.mark.skipif(not qgemm_available(), reason="the native build has no AVX512-BF16 kernel on this CPU")
def test_the_packed_kernel_refuses_what_does_not_fit():
    x = torch.randn(2, IN).to(torch.bfloat16)
    wrong = pack_weight(PACK_BF16, torch.randn(OUT, IN).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.fundament.qgemm(x[:, :-32], PACK_BF16, wrong, torch.empty(0), torch.empty(0), False)
    # float32 rows are a float32 model's (csrc/qgemm_f32.h takes them); other types are refused
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.fundament.qgemm(x.half(), PACK_BF16, wrong, torch.empty(0), torch.empty(0), False)


@pytest.mark.skipif(not qgemm_available(), reason="the native build has no AVX512-BF16 kernel on this CPU")
@pytest.mark.parametrize("out", [80, 144])  # 5 and 9 panels: two threads split a block of 4 between them
@pytest.mark.parametrize("rows", [1, 64])
def test_threads_sharing_a_block_of_panels_compute_what_one_thread_does(out, rows, unit):
    """Threads split the output panels evenly, so a block of the packed layout can be part one
    thread's and part the other's: each must read its own panels of it, and every output keep its
    bits whoever computes it."""
    torch.manual_seed(3)
    levels = torch.randint(0, 16, (out, IN)).float()
    levels[:, 0::INT4_GROUP], levels[:, 1::INT4_GROUP] = 0, 15
    w4 = (levels - 8) * torch.rand(out, IN // INT4_GROUP).repeat_interleave(INT4_GROUP, 1) * 0.01
    w8 = torch.randn(out, IN) * 0.05
    x = torch.randn(rows, IN).to(torch.bfloat16)
    for lin, w in (
        (Linear(w4.to(torch.bfloat16), int8=True, source=w4, pack=True), w4),
        (Linear(w8.to(torch.bfloat16), int8=True, pack=True), w8.to(torch.bfloat16).float()),
    ):
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            alone = lin(x, n_decode=rows)
            torch.set_num_threads(2)
            shared = lin(x, n_decode=rows)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(alone, shared)
        want = x.float() @ w.t()
        assert (shared.float() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.skipif(not amx_available(), reason="no AMX on this CPU")
def test_amx_tiles_and_vector_units_agree_but_only_one_serves():
    """Where the CPU has AMX, its tiles are the default for bf16, int8 and int4 weights: they sum a
    tile's products in their own order and rounding, so the two units' results differ in the last
    bits (which is why the kernel never mixes them by number of rows), and both are close to float32
    arithmetic."""
    op = torch.ops.fundament.qgemm_amx
    assert op() is True
    torch.manual_seed(4)
    w4, w8 = int4_source(), torch.randn(OUT, IN) * 0.05
    x = torch.randn(64, IN).to(torch.bfloat16)
    for w, lin in (
        (w4, Linear(w4.to(torch.bfloat16), int8=True, source=w4, pack=True)),
        (w8.to(torch.bfloat16).float(), Linear(w8.to(torch.bfloat16), int8=True, pack=True)),
    ):
        assert lin.packed is not None
        kind, a, b = lin.packed
        try:  # float32 out: bf16's rounding would hide the last bits
            tiles = torch.ops.fundament.qgemm(x, kind, a, b, torch.empty(0), True)
            op(0)
            vector = torch.ops.fundament.qgemm(x, kind, a, b, torch.empty(0), True)
        finally:
            op(1)
        want = x.float() @ w.t()
        assert not torch.equal(tiles, vector)
        for got in (tiles, vector):
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.mark.skipif(not amx_available(), reason="no AMX on this CPU")
def test_the_environment_can_keep_the_vector_units():
    """FUNDAMENT_AMX=0 keeps a process off the tiles (asked once, at its first matmul); unset, a
    process with AMX takes them."""
    import os
    import subprocess
    import sys

    ask = "from fundament.models import native; import torch; native.load(); print(torch.ops.fundament.qgemm_amx())"
    for value, want in (("0", "False"), (None, "True")):
        env = {k: v for k, v in os.environ.items() if k != "FUNDAMENT_AMX"}
        if value is not None:
            env["FUNDAMENT_AMX"] = value
        out = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip().splitlines()[-1] == want, out.stderr[-2000:]
