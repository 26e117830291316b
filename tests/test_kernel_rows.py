"""The decode kernels compute each row alone: a row's result is bit for bit the same whatever the
number of rows beside it. The engine's batch invariance rests on this for decode rows (prompt rows
get matmuls of their own instead); if a CPU's kernels ever break it, this says so directly."""

from __future__ import annotations

import pytest
import torch

from fundament.models.llama import INT4_GROUP, Linear

ROWS = (1, 2, 3, 5, 8, 16, 17, 33, 64)


def cpu_flags() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none of avx512_bf16/amx"


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    levels = torch.randint(0, 16, (1536, 576)).float()  # exactly representable in int4 groups: the q4 path
    levels[:, 0::INT4_GROUP], levels[:, 1::INT4_GROUP] = 0, 15  # each group spans every level, as a Q4 GGUF's do
    scale = torch.rand(1536, 576 // INT4_GROUP).repeat_interleave(INT4_GROUP, 1) * 0.01
    int4 = Linear(((levels - 8) * scale).to(torch.bfloat16), int8=True, source=(levels - 8) * scale)
    int8 = Linear((torch.randn(1536, 576) * 0.05).to(torch.bfloat16), int8=True, source=torch.randn(1536, 576))
    return {"int4": int4, "int8": int8}


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no int4 kernel in this torch")
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_decode_row_is_computed_alone_whatever_the_batch(weights, kind):
    lin = weights[kind]
    assert (lin.q4 is not None) == (kind == "int4") and (lin.q8 is not None) == (kind == "int8")
    torch.manual_seed(1)
    x = torch.randn(max(ROWS), 576).to(torch.bfloat16)
    alone = torch.cat([lin(x[i : i + 1], n_decode=1) for i in range(max(ROWS))])
    for m in ROWS:
        together = lin(x[:m], n_decode=m)
        assert torch.equal(together, alone[:m]), (
            f"{kind}: rows computed {m} at a time differ from alone (CPU: {cpu_flags()})"
        )
