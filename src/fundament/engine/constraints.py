"""Constrained decoding: a grammar (JSON schema, regex, Lark) enforced per row through the
logits-processor hook, with llguidance as the grammar engine.

llguidance because it compiles JSON schemas lazily (no up-front automaton over the whole
vocabulary, so a new schema costs milliseconds, not seconds), computes each step's token mask in
tens of microseconds, and says precisely which schema keyword it cannot enforce, so a request can
be refused with that name instead of the schema being silently ignored.
Knows token ids and a tokenizer's token table; knows nothing of HTTP or chat messages.
"""

from __future__ import annotations

import json
import logging

import llguidance
import llguidance.torch
import torch

from ..errors import InvalidRequestError

log = logging.getLogger(__name__)


def json_schema_grammar(schema: dict, param: str, lenient: bool = False) -> str:
    """A grammar for `schema`, or a 400 naming what the grammar engine cannot enforce. Lenient:
    enforce what it can and skip the rest (the caller then validates the output)."""
    if lenient:
        schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), "lenient": True}}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except Exception as e:  # malformed schema
        raise InvalidRequestError(f"Invalid JSON schema: {e}", param) from e
    return _validated(grammar, param, "JSON schema")


def regex_grammar(pattern: str, param: str) -> str:
    return _validated(llguidance.grammar_from("regex", pattern), param, "regex")


def choice_grammar(choices: list[str], param: str) -> str:
    lark = "start: " + " | ".join(json.dumps(c) for c in choices)
    return _validated(llguidance.grammar_from("lark", lark), param, "choice list")


def lark_grammar(lark: str, param: str) -> str:
    """A grammar in llguidance's Lark dialect (vLLM's `structured_outputs.grammar` with its guidance backend)."""
    try:
        grammar = llguidance.grammar_from("lark", lark)
    except Exception as e:  # noqa: BLE001 - a grammar that does not parse
        raise InvalidRequestError(f"This grammar does not parse as Lark: {e}", param) from e
    return _validated(grammar, param, "grammar")


def _validated(grammar: str, param: str, what: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(
            f"This {what} cannot be enforced by the grammar engine: {error}. Remove or rewrite that part.", param
        )
    return grammar


class GrammarConstraint:
    """A logits processor that masks every token the grammar does not allow next. One per
    sequence: it follows the sequence's own output ids."""

    def __init__(self, ll_tokenizer: llguidance.LLTokenizer, grammar: str):
        self.grammar = grammar  # what a vLLM backend is sent instead (engine/vllm.py)
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        self.eos = ll_tokenizer.eos_token
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
        self.consumed = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self.consumed :]:
            self.matcher.consume_token(token)
        self.consumed = len(output_ids)
        if self.matcher.is_error():  # never free text instead: end the sequence here
            log.error("grammar matcher failed: %s", self.matcher.get_error())
            eos = self.eos
            logits[:] = float("-inf")
            logits[eos] = 0.0
            return logits
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits.unsqueeze(0), self.bitmask)
        return logits
