"""Linear layers for the engine: a bf16 weight for prompt rows, and a low-bit copy (int4 where
exact, else int8) whose kernels compute each decode row alone; LoRA adapters ride on top."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

INT4_GROUP = 32


def _int4_if_lossless(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Packed int4 (groups of 32 along the input, scale and offset per group) for torch's
    `_weight_int4pack_mm_for_cpu`, but only if it represents `weight` exactly: true of weights
    that came from a Q4_0/Q4_1 GGUF, where a group's min and max are its lowest and highest
    levels. Anything else keeps the int8 path, so int4 never costs quality. None if not exact."""
    N, K = weight.shape
    if K % INT4_GROUP or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    w = weight.float().view(N, K // INT4_GROUP, INT4_GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)  # (N, groups)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
    if ((q * scale[..., None] + lo[..., None] - w).abs() > 1e-3 * scale[..., None]).any():
        return None
    # The kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale.
    sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()  # (groups, N, 2)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(N, K).to(torch.int32), 1)
    except RuntimeError:
        return None
    return packed, sz


class Linear:
    """y = x W^T (+ b). On CPU in bfloat16 it also keeps a low-bit copy of the weight for decode
    rows, since decode reads every weight once per token and is bound by bytes read: int4 where
    that is exact (weights from a 4-bit GGUF), else weight-only int8 with per-row scales (torch's
    `_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm`, the kernels gpt-fast uses)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        int8: bool = False,
        source: torch.Tensor | None = None,
    ):
        """`source`: the weight as loaded (before the cast to `weight`'s dtype), to tell whether
        int4 is exact; without it only int8 is considered."""
        self.weight, self.bias = weight, bias
        self.q4: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed int4, scales and zeros)
        self.q8: torch.Tensor | None = None  # int8 weight, with per-row `scale`
        self.scale: torch.Tensor | None = None
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter slot -> (A, B scaled)
        if int8 and source is not None:
            self.q4 = _int4_if_lossless(source)
        if int8 and self.q4 is None:
            # In slices of rows, so the float32 temporaries of a large matrix (the 49k x 576 output
            # head) never add hundreds of MB to the peak while loading.
            scale = torch.empty(weight.shape[0])
            self.q8 = torch.empty(weight.shape, dtype=torch.int8)
            for i in range(0, weight.shape[0], 4096):
                w = weight[i : i + 4096].float()
                scale[i : i + 4096] = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (rows,)
                self.q8[i : i + 4096] = torch.round(w / scale[i : i + 4096, None]).clamp(-127, 127).to(torch.int8)
            self.scale = scale.to(weight.dtype)

    def __call__(
        self,
        x: torch.Tensor,
        n_decode: int = 0,
        lora_rows: Sequence[tuple[int, torch.Tensor]] = (),
        splits: list[int] | None = None,
    ) -> torch.Tensor:
        """x: (N, in). The first n_decode rows are decode tokens: they take the int4/int8 path
        (those kernels compute each row alone, whatever the number of rows). The rest are prompt
        rows, in runs of `splits` rows (one per sequence; None: one run): each run is its own
        matmul, since the bf16 GEMM picks its kernel, and so its rounding, by the number of rows
        (with AMX, tile kernels from a few rows up), and a sequence's rows must not be computed
        differently because other prompts share its step."""
        quantized = (self.q4 is not None or self.q8 is not None) and n_decode > 0
        parts = []
        if quantized:
            if self.q4 is not None:
                parts.append(
                    torch.ops.aten._weight_int4pack_mm_for_cpu(x[:n_decode], self.q4[0], INT4_GROUP, self.q4[1])
                )
            else:
                parts.append(torch.ops.aten._weight_int8pack_mm(x[:n_decode], self.q8, self.scale))
            if self.bias is not None:
                parts[0] = parts[0] + self.bias
        runs = [n_decode] if n_decode and not quantized else []  # rows of each dense matmul
        if x.shape[0] > n_decode:
            runs += list(splits) if splits else [x.shape[0] - n_decode]
        parts += [F.linear(rows, self.weight, self.bias) for rows in x[n_decode if quantized else 0 :].split(runs)]
        y = (
            torch.cat(parts) if len(parts) > 1 else parts[0] if parts else F.linear(x, self.weight, self.bias)
        )  # no rows at all
        # LoRA: each adapter's rows get x A^T B^T added (B carries the scale), one group at a time.
        for slot, rows in lora_rows:
            ab = self.lora.get(slot)
            if ab is not None:
                y.index_add_(0, rows, F.linear(F.linear(x.index_select(0, rows), ab[0]), ab[1]))
        return y
