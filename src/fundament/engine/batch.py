"""One engine step's batch: which tokens of which running requests go into the forward pass, in
which order, and which of its logit rows are read back.

The order and the chunking are what keep a request's numerics independent of its company: every
choice here depends on the request's own state only (see docs/engine.md, "A request's output does
not depend on its batch").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.llama import Segment
from .request import EngineRequest


@dataclass
class Entry:
    """One request's share of the step."""

    req: EngineRequest
    length: int  # its tokens this step
    read_at: int  # its first row among the logit rows read
    read_count: int  # how many logit rows it reads (0: a scoring chunk no continuation follows)


@dataclass
class StepBatch:
    tokens: list[int]
    segments: list[Segment]
    rows: list[int]  # the batch rows whose logits are read, sampled ones first
    entries: list[Entry]
    n_sampled: int  # the first n_sampled of `rows` are only sampled from (one per such request)


def order(req: EngineRequest, n: int) -> int:
    """Where a request's n tokens of this step go in the batch: 0 a generated token, 1 a prompt's
    one-token chunk, 2 a prompt chunk, 3 a prompt chunk with prompt_logprobs, 4 a token tree.

    Every plain one-token segment goes first, generated tokens (decode steps) before a prompt's
    one-token last chunk: the model runs those rows through its decode kernels (generated ones
    maybe as int8 rows), and which kernels a row meets must not depend on what else is in the
    batch. (A scoring request's segments carry a tree mask and always take the prompt path.) Then
    plain prompt chunks, token trees last: the model runs the plain rows in front through one
    kernel. Chunks whose logits are reported (prompt_logprobs) go after those whose logits are only
    sampled from, so the rows read from the model's output head are the sampled ones first (its
    fast int8 copy, if it has one), then the reported or scored ones (its exact weights): which one
    a row meets never depends on the batch."""
    if req.reports_logits:
        return 4 if req.tree is not None else 3
    if n > 1:
        return 2
    return 0 if req.decoding else 1


def build_step(running: list[EngineRequest], chunk: int, adapters: dict[str, int]) -> StepBatch | None:
    """The step's batch over the running requests (None: nothing to compute). `chunk` is the
    step's token budget (engine.max_num_batched_tokens), `adapters` the loaded adapters' slots."""
    work: list[tuple[EngineRequest, list[int]]] = []  # (request, its tokens this step)
    # Decoding sequences first (one token each), so long prompts never stall them.
    for req in running:
        if req.decoding:
            work.append((req, [req.output_ids[req.num_computed - len(req.prompt_ids)]]))
    # Prompts are prefilled in chunks at fixed boundaries (multiples of the step budget from the
    # first token), never cut to whatever budget is left: the chunking, and so the numerics, of a
    # request's prefill must not depend on what else is running.
    budget = chunk
    for req in running:
        remaining = len(req.prefill_ids) - req.num_computed
        if remaining > 0:
            n = min(remaining, chunk - req.num_computed % chunk)
            if n > budget:
                break  # first come, first served: later prompts wait for the next step
            budget -= n
            work.append((req, req.prefill_ids[req.num_computed : req.num_computed + n]))
    if not work:
        return None
    work.sort(key=lambda w: order(w[0], len(w[1])))
    batch = StepBatch([], [], [], [], 0)
    for req, toks in work:
        start, n = req.num_computed, len(toks)
        assert req.cache is not None  # a running request holds its cache until it is released
        slot = None if req.adapter is None else adapters.get(req.adapter)
        seg = Segment(req.cache, start, n, slot, generated=req.decoding)
        if req.tree is not None:
            seg.positions, seg.mask = req.tree.positions[start : start + n], req.tree.mask(start, n)
            seg.key_positions = req.tree.positions[: start + n]
        first = len(batch.tokens)
        batch.segments.append(seg)
        batch.tokens.extend(toks)
        # Rows whose logits are needed: each segment's last, every prompt row for
        # prompt_logprobs, or a scoring request's rows that some continuation token follows
        # (maybe none).
        at = len(batch.rows)
        if req.tree is not None:
            batch.rows.extend(first + r - start for r in req.tree.read_rows(start, n))
        elif req.params.prompt_logprobs and start < len(req.prompt_ids):
            batch.rows.extend(range(first, first + n))
        else:
            batch.rows.append(first + n - 1)
        batch.entries.append(Entry(req, n, at, len(batch.rows) - at))
        if not req.reports_logits:
            batch.n_sampled += len(batch.rows) - at
    return batch
