"""Writing a Llama-family model as GGUF (llama.cpp, Ollama) with PyPI's `gguf`: the weights of a
Hugging Face state dict in F16 or Q8_0, and everything else (tokenizer, merges, special tokens,
chat template, architecture settings) copied from the GGUF the model was first loaded from, so
nothing that file carried is lost. Also the Ollama Modelfile for it. Knows tensors and file
formats; not PEFT, jobs or names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequestError

QUANTS = {"f16": "F16", "q8_0": "Q8_0"}
_FILE_TYPE = {"f16": 1, "q8_0": 7}  # llama.cpp's general.file_type: MOSTLY_F16, MOSTLY_Q8_0


def _gguf_layout(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj / k_proj rows in GGUF's rotary layout: Hugging Face's Llama rotates the two halves of
    each head (rotate_half), GGUF's pairs of neighbours, so each head's rows are interleaved. The
    inverse of what transformers undoes when it reads a GGUF."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(source: Path, state: dict[str, torch.Tensor], out: Path, quant: str = "f16") -> Path:
    """`state` (Hugging Face names, e.g. a merged model's) as a GGUF at `out`, with every key of
    `source` but the file type, and the same tensors `source` has (a tied head stays tied)."""
    import gguf

    if quant not in QUANTS:
        raise InvalidRequestError(f"quantization must be one of {', '.join(QUANTS)}, got {quant!r}.", "quantization")
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise InvalidRequestError(f"GGUF export knows the llama architecture; {source.name} is {arch!r}.", "model")
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    n_blocks = int(reader.fields["llama.block_count"].contents())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    ours: dict[str, torch.Tensor] = {}
    for hf_name, w in state.items():
        base, _, kind = hf_name.rpartition(".")
        target = names.get_name(base)
        if target is None:
            continue  # e.g. rotary tables: computed, not stored
        w = w.float()
        if base.endswith("self_attn.q_proj"):
            w = _gguf_layout(w, n_head)
        elif base.endswith("self_attn.k_proj"):
            w = _gguf_layout(w, n_kv)
        ours[f"{target}.{kind}"] = w
    wanted = [t.name for t in reader.tensors]
    missing = [n for n in wanted if n not in ours]
    if missing:
        raise InvalidRequestError(f"the model has no weights for {', '.join(missing[:3])} of {source.name}.", "model")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # written by the writer itself, or describing the old weights
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(_FILE_TYPE[quant])
    qtype = getattr(gguf.GGMLQuantizationType, QUANTS[quant])
    for name in wanted:
        arr = ours[name].numpy()
        if (
            arr.ndim == 1 or arr.shape[-1] % 32
        ):  # norms (and rows Q8_0 cannot block) stay float32, as llama.cpp keeps them
            writer.add_tensor(name, arr.astype(np.float32))
        elif quant == "f16":
            writer.add_tensor(name, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr.astype(np.float32), qtype)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def gguf_chat_template(source: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(source)).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None


def ollama_modelfile(gguf_name: str, chat_template: str | None, default_system: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it: the chat template in Ollama's Go template syntax
    for the formats it can be translated from exactly (ChatML, as SmolLM2 and Qwen use; Llama 3),
    and their stop tokens. Another template is left to Ollama, which reads the GGUF's own."""
    lines = [f"FROM ./{gguf_name}", ""]
    tpl = chat_template or ""
    if "<|im_start|>" in tpl:
        system = (
            "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            if not default_system
            else "<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}"
            + default_system
            + "{{ end }}<|im_end|>\n"
        )
        template = (
            system + '{{ range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
            "{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"
        )
        lines += [f'TEMPLATE """{template}"""', 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    elif "<|start_header_id|>" in tpl:
        template = (
            "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
            '{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
            "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        lines += [f'TEMPLATE """{template}"""', 'PARAMETER stop "<|eot_id|>"']
    else:
        lines += ["# The chat template is the GGUF's own (tokenizer.chat_template), which Ollama reads."]
    if default_system and "<|im_start|>" not in tpl:
        lines.append(f"SYSTEM {json.dumps(default_system)}")
    return "\n".join(lines) + "\n"
