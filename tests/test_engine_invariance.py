"""A request's greedy tokens do not depend on what else runs in its step, even where the GEMM
rounds differently by row count (bf16 with AMX does): the native build's packed kernel computes
every row alone, and without it each prompt's rows get matmuls of their own. Simulated here with a
matmul whose result depends on its number of rows, so it holds on any CPU."""

from __future__ import annotations

import random
import types

import pytest
import torch
import torch.nn.functional as F

from fundament.config import EngineConfig
from fundament.engine import Engine, EngineRequest, SamplingParams
from fundament.models.llama import LlamaModel, linear


def shape_dependent_linear(x, weight, bias=None):
    """F.linear, off by an amount that depends on the number of rows, as a kernel chosen by shape
    is off in its last bits (exaggerated so that a tiny model's argmax shows it)."""
    y = F.linear(x, weight, bias)
    return y + 0.05 * (x.shape[0] % 3) * torch.sin(torch.arange(y.shape[-1], dtype=y.dtype))


@pytest.fixture
def uneven_gemm(monkeypatch):
    monkeypatch.setattr(linear, "F", types.SimpleNamespace(linear=shape_dependent_linear))


def generate(model, prompts, together: bool, n=16):
    outs = [[] for _ in prompts]
    reqs = [
        EngineRequest(list(p), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), outs[i].append)
        for i, p in enumerate(prompts)
    ]
    groups = [reqs] if together else [[r] for r in reqs]
    for group in groups:
        engine = Engine(model, EngineConfig(max_num_batched_tokens=256), [2])
        for r in group:
            engine.submit(r)
        while not all(r.finished for r in group):
            engine.step()
    return [[o.token_id for o in out] for out in outs]


PROMPTS = [
    [random.Random(i).randrange(3, 500) for _ in range(random.Random(100 + i).randrange(2, 40))] for i in range(12)
]


@pytest.mark.parametrize("native_decode", [True, False])
def test_prompts_prefilled_together_equal_each_alone_with_a_shape_dependent_gemm(
    tiny_llama, uneven_gemm, native_decode
):
    """The default CPU setting: bf16 with low-bit decode weights, whose kernels compute each decode
    row alone; prompt rows through the (here shape-dependent) GEMM, a matmul per prompt."""
    model = LlamaModel.from_dir(tiny_llama, dtype=torch.bfloat16, int8_decode=True, native_decode=native_decode)
    assert generate(model, PROMPTS, together=True) == generate(model, PROMPTS, together=False)


def test_without_batch_invariance_the_same_gemm_changes_outputs(tiny_llama, uneven_gemm):
    """Without the packed kernel, the opt-out (engine.batch_invariant: false) runs one matmul for
    all prompt rows of a step: faster, and the simulated kernel then shows through; this is what
    the default guards."""
    model = LlamaModel.from_dir(
        tiny_llama, dtype=torch.bfloat16, int8_decode=True, native_decode=False, batch_invariant=False
    )
    assert generate(model, PROMPTS, together=True) != generate(model, PROMPTS, together=False)
