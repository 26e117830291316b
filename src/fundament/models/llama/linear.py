"""Linear layers for the engine: a bf16 weight for prompt rows, and a low-bit copy (int4 where
exact, else int8) whose kernels compute each decode row alone; LoRA adapters ride on top. The
low-bit copy is in the native build's own layout (csrc/qgemm.h: one AVX512-BF16 kernel for any
number of rows) where it has that kernel, else in torch's for its int4/int8 kernels. In float32
only copies that are exact (int4 and int8 with a scale per group, a 4-bit or Q8_0 GGUF's weights),
for csrc/qgemm_f32.h's AVX2 kernel, which every row then takes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

INT4_GROUP = 32
PACK_PANEL, PACK_BLOCK = 16, 4  # csrc/qgemm.h's output columns per panel, panels per block
PACK_BF16, PACK_INT8, PACK_INT4 = 0, 1, 2  # csrc/qgemm.h's kBF16, kI8, kI4
PACK_INT8G = 3  # csrc/qgemm_f32.h's kI8G: int8 with a float16 scale per column and group of 32 (Q8_0)
PACK_INT8X = 4  # added to PACK_INT4 or PACK_INT8G: times int8 activations (csrc/qgemm_f32.h's kInt8X)


def _int4_levels(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`weight` as int4 levels q (0..15) with a scale and offset per group of 32 inputs
    (w = q * scale + offset), but only if that represents it exactly: true of weights that came
    from a Q4_0/Q4_1 GGUF, where a group's min and max are its lowest and highest levels.
    Anything else keeps the int8 path, so int4 never costs quality. None if not exact."""
    N, K = weight.shape
    if K % INT4_GROUP:
        return None
    w = weight.float().view(N, K // INT4_GROUP, INT4_GROUP)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)  # (N, groups)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
    if ((q * scale[..., None] + lo[..., None] - w).abs() > 1e-3 * scale[..., None]).any():
        return None
    return q.view(N, K).to(torch.uint8), scale, lo


def _int4_is_bitwise(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> bool:
    """Whether the packed int4 (float16 scale and offset) gives back exactly `weight`, as
    csrc/qgemm_f32.h computes it: q * scale + offset with one rounding to float32 (exact in float64)."""
    N, K = weight.shape
    s, o = (t.half().double()[..., None] for t in (scale, lo))
    w = (q.view(N, K // INT4_GROUP, INT4_GROUP).double() * s + o).float().view(N, K)
    return torch.equal(w, weight)


def _int8_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`weight` as int8 levels with a float16 scale per group of 32 inputs (w = q * scale), but
    only if that is exactly what it is: weights from a Q8_0 GGUF, where a group's largest
    magnitude is 127 steps. None otherwise."""
    N, K = weight.shape
    if K % INT4_GROUP or weight.dtype != torch.float32:
        return None
    w = weight.view(N, K // INT4_GROUP, INT4_GROUP)
    scale = w.abs().amax(-1) / 127  # (N, groups): exact where w is q * scale with max |q| = 127
    if not torch.equal(scale.half().float(), scale):
        return None
    q = torch.round(w / scale.clamp(min=1e-30)[..., None])
    if q.abs().amax() > 127 or not torch.equal(q * scale[..., None], w):
        return None
    return q.view(N, K).to(torch.int8), scale


def _torch_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The levels in the layout of torch's `_weight_int4pack_mm_for_cpu`; None where this torch
    has no such kernel."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    # The kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale.
    sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()  # (groups, N, 2)
    try:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), sz
    except RuntimeError:
        return None


def _vnni(t: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N/16, K/32, 16, 32): per panel of 16 output columns, group of 32 inputs and pair
    of inputs kp in the group, lane e holds column e // 2, input 2 kp + e % 2 (the operand order of
    AVX512-BF16's dot product)."""
    N, K = t.shape
    lanes = t.view(N // PACK_PANEL, PACK_PANEL, K // 2, 2).permute(0, 2, 1, 3)
    return lanes.reshape(N // PACK_PANEL, K // INT4_GROUP, INT4_GROUP // 2, 32)


def _blocks(units: torch.Tensor) -> torch.Tensor:
    """Units (panels, groups, bytes) in csrc/qgemm.h's order: blocks of 4 panels, and in a block
    group by group. Returned as (panels, groups * bytes) uint8: each panel's share of the bytes
    (the kernel takes the number of columns from the rows)."""
    P, G, U = units.shape
    full = P // PACK_BLOCK * PACK_BLOCK
    parts = [units[:full].view(-1, PACK_BLOCK, G, U).transpose(1, 2).reshape(-1)]
    if full < P:
        parts.append(units[full:].transpose(0, 1).reshape(-1))
    return torch.cat(parts).view(P, G * U)


def pack_weight(kind: int, weight: torch.Tensor, scale: torch.Tensor | None = None, lo: torch.Tensor | None = None):
    """csrc/qgemm.h's packed bytes of a weight: PACK_BF16 (weight bf16 (N, K)), PACK_INT8 (weight
    int8), or PACK_INT4 (weight: levels 0..15, with `scale` and `lo` per group of 32: (N, K/32));
    csrc/qgemm_f32.h's PACK_INT8G (weight int8 with `scale` per group of 32)."""
    N, K = weight.shape
    lanes = _vnni(weight)  # (N/16, K/32, 16, 32)

    def per_unit(t: torch.Tensor) -> torch.Tensor:  # (N, K/32) -> float16 (N/16, G, 16): one unit's columns
        return t.half().view(N // PACK_PANEL, PACK_PANEL, K // INT4_GROUP).transpose(1, 2)

    if kind == PACK_INT8G:
        assert scale is not None
        head = per_unit(scale).contiguous().view(torch.uint8)  # (N/16, G, 32)
        return _blocks(torch.cat([head, lanes.contiguous().view(torch.uint8).flatten(2)], dim=-1))
    if kind == PACK_INT4:
        assert scale is not None and lo is not None
        q = (lanes[..., :16] | (lanes[..., 16:] << 4)).to(torch.uint8).flatten(2)  # (N/16, G, 256)
        # float16 scales: a dequantized weight is rounded to bf16 (8 bits) anyway, and 11 bits
        # read half the bytes of float32 where one decode row is bound by bytes read.
        head = torch.cat([per_unit(scale), per_unit(lo)], dim=-1).contiguous().view(torch.uint8)  # (N/16, G, 64)
        return _blocks(torch.cat([head, q], dim=-1))
    return _blocks(lanes.contiguous().view(torch.uint8).flatten(2))


def packable(weight: torch.Tensor) -> bool:
    """Shapes csrc/qgemm.h takes: outputs in panels of 16, inputs in groups of 32."""
    return weight.shape[0] % PACK_PANEL == 0 and weight.shape[1] % INT4_GROUP == 0


class Linear:
    """y = x W^T (+ b). On CPU in bfloat16 it also keeps a low-bit copy of the weight for decode
    rows, since decode reads every weight once per token and is bound by bytes read: int4 where
    that is exact (weights from a 4-bit GGUF), else weight-only int8 with per-row scales (torch's
    `_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm`, the kernels gpt-fast uses). Prompt rows
    never take int8: they keep the bf16 weight (`dense_prompts`)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        int8: bool = False,
        source: torch.Tensor | None = None,
        pack: bool = False,
        int8x: bool = False,
    ):
        """`source`: the weight as loaded (before the cast to `weight`'s dtype), to tell whether
        int4 is exact; without it only int8 is considered. `pack`: keep the low-bit copy in
        csrc/qgemm.h's layout (the native build has it, `qgemm_available()`) instead of torch's.
        `int8x`: a float32 weight's packed copy may multiply int8 copies of rows (a scale per 32
        inputs: integer dot products, csrc/qgemm_f32.h) instead of the float32 rows: those the
        caller names (`n_int8`), the model's generated tokens."""
        self.weight, self.bias = weight, bias
        self._bias_arg = bias if bias is not None else torch.empty(0)  # the packed kernel's: none = empty
        self.q4: tuple[torch.Tensor, torch.Tensor] | None = None  # (packed int4, scales and zeros)
        self.q8: torch.Tensor | None = None  # int8 weight, with per-row `scale`
        self.scale: torch.Tensor | None = None
        # (kind, weights, scales) in csrc/qgemm.h's layout: one kernel for every number of rows
        self.packed: tuple[int, torch.Tensor, torch.Tensor] | None = None
        # Where `packed` is int8 (not exact), prompt rows keep the bf16 weight (kept, not dropped:
        # for a head tied to the embedding it costs nothing), as their logits score
        # classifications and prompt_logprobs (SmolLM2's int8 head, zero-shot SST-2 dev accuracy:
        # 0.722; bf16 0.724; float32 0.725)
        self.dense_prompts = False
        self.int8x = False  # the packed float32 copy also takes int8 rows (the first `n_int8` of a call)
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter slot -> (A, B scaled)
        if weight.dtype == torch.float32:
            # float32: only a copy that is exact, for csrc/qgemm_f32.h, which every row then takes;
            # else the float32 weight alone.
            if pack and int8 and packable(weight):
                exact = source.float() if source is not None else weight
                levels = _int4_levels(exact)
                if levels is not None and not _int4_is_bitwise(exact, *levels):
                    levels = None  # close (a K-quant's), not the same float32 weights: not in float32
                if levels is not None:
                    self.packed = (PACK_INT4, pack_weight(PACK_INT4, *levels), torch.empty(0))
                elif (groups := _int8_groups(exact)) is not None:
                    self.packed = (PACK_INT8G, pack_weight(PACK_INT8G, groups[0], groups[1]), torch.empty(0))
                if self.packed is not None:
                    self.int8x = int8x
                    self._drop_weight()
            return
        pack = pack and int8 and weight.dtype == torch.bfloat16 and packable(weight)
        levels = _int4_levels(source) if int8 and source is not None else None
        if levels is not None:
            if pack:
                self.packed = (PACK_INT4, pack_weight(PACK_INT4, *levels), torch.empty(0))
                self._drop_weight()
                return
            self.q4 = _torch_int4(*levels)
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
            if pack:  # the kernel applies the scale to each column's float32 sum
                self.packed = (PACK_INT8, pack_weight(PACK_INT8, self.q8), scale)
                self.dense_prompts = True
                self.q8 = self.scale = None

    def __call__(
        self,
        x: torch.Tensor,
        n_decode: int = 0,
        lora_rows: Sequence[tuple[int, torch.Tensor]] = (),
        splits: list[int] | None = None,
        n_int8: int = 0,
    ) -> torch.Tensor:
        """x: (N, in). The first n_decode rows are decode tokens, the rest prompt rows in runs of
        `splits` rows (one per sequence; None: one run). With `int8x`, the first `n_int8` rows
        are multiplied as int8 copies, the rest in float32. With the packed kernel every row goes
        through it in one call: it computes each row alone, whatever the number of rows. Else the
        decode rows take torch's int4/int8 kernels (which do too) and each run of prompt rows is
        its own bf16 matmul, since that GEMM picks its kernel, and so its rounding, by the number
        of rows (with AMX, tile kernels from a few rows up), and a sequence's rows must not be
        computed differently because other prompts share its step."""
        if self.packed is not None:
            kind, a, b = self.packed
            if self.weight.dtype == torch.float32:  # every row, float32 in and out (csrc/qgemm_f32.h)
                x, n = x.float(), n_int8 if self.int8x else 0
                runs = [(x[:n], kind + PACK_INT8X), (x[n:], kind)] if n else [(x, kind)]
                ys = [torch.ops.fundament.qgemm(r, k, a, b, self._bias_arg, True) for r, k in runs if len(r) or not n]
                y = torch.cat(ys) if len(ys) > 1 else ys[0]
            elif self.dense_prompts and x.shape[0] > n_decode:  # prompt rows: bf16, a matmul per run
                ys = [torch.ops.fundament.qgemm(x[:n_decode].to(torch.bfloat16), kind, a, b, self._bias_arg, False)]
                ys += [F.linear(r, self.weight, self.bias) for r in x[n_decode:].split(splits or [len(x) - n_decode])]
                y = torch.cat(ys).to(x.dtype)
            else:
                y = torch.ops.fundament.qgemm(x.to(torch.bfloat16), kind, a, b, self._bias_arg, False).to(x.dtype)
        else:
            y = self._unpacked(x, n_decode, splits)
        # LoRA: each adapter's rows get x A^T B^T added (B carries the scale), one group at a time.
        for slot, rows in lora_rows:
            ab = self.lora.get(slot)
            if ab is not None:
                y.index_add_(0, rows, F.linear(F.linear(x.index_select(0, rows), ab[0]), ab[1]))
        return y

    def _drop_weight(self) -> None:
        """Every row goes through the packed copy: the bf16 weight is not read again, and its
        memory (2 bytes a weight, ~210 MB for SmolLM2's layers) goes. A weight shared with
        something else (the output head tied to the embedding) stays alive there."""
        self.weight = self.weight.new_empty(0)

    def _unpacked(self, x: torch.Tensor, n_decode: int, splits: list[int] | None) -> torch.Tensor:
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
        return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else F.linear(x, self.weight, self.bias)
