"""Text <-> token ids for a generation model, and the chat template from the model's own metadata."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import InvalidRequestError


def _one_text(out: object) -> str:
    """transformers types decode and apply_chat_template(tokenize=False) as `str | list[str]`
    (they take batches too); one id list or one conversation gives one string."""
    if not isinstance(out, str):
        raise TypeError(f"the tokenizer returned {type(out).__name__} where one string was expected")
    return out


def _tools(tools: list[dict] | None) -> dict:
    """apply_chat_template's keyword for tools, only when there are some (a template may test
    `tools is defined`)."""
    return {"tools": tools} if tools else {}


class ChatTokenizer:
    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        # A base model (GPT-2, OPT) may have none: it serves completions, and chat is refused per request.
        self.has_chat_template = bool(self.hf.chat_template)
        self.eos_token_ids = sorted({i for i in [self.hf.eos_token_id] if i is not None} | self._end_of_turn_ids(path))
        self.vocab_size = len(self.hf)
        # One decoded string per id, for logprobs' `token` fields.
        self._pieces: dict[int, str] = {}

    def _end_of_turn_ids(self, path: str | Path) -> set[int]:
        """The model's own end-of-turn tokens: its generation config's `eos_token_id` (one id or a
        list: Llama 3's <|eot_id|> and <|end_of_text|>, Qwen's <|im_end|> and <|endoftext|>). A
        directory without one (a dequantized GGUF) falls back to the end-of-turn tokens of the
        common chat formats that its vocabulary has."""
        gen = Path(path) / "generation_config.json"
        if gen.is_file():
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id")
            except (OSError, ValueError) as e:
                raise InvalidRequestError(f"{gen} is not readable JSON: {e}", "model") from e
            listed = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
            if listed:
                return {int(i) for i in listed}
        ids = set()
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            i = self.hf.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i != self.hf.unk_token_id:
                ids.add(i)
        return ids

    @functools.cached_property
    def hermes_tools(self) -> bool:
        """Whether the chat template offers tools itself (it reads `tools`) and asks for calls as
        `<tool_call>{...}</tool_call>`, the form fundament parses and enforces (Qwen 2.5, Qwen 3,
        Hermes). Other templates' tool formats differ: tools are described in the system message."""
        template = self.hf.chat_template if isinstance(self.hf.chat_template, str) else ""  # none: no tools either
        return "tools" in template and "<tool_call>" in template

    @functools.cached_property
    def ll_tokenizer(self):
        """The token table in the grammar engine's form (built on first use: ~0.5 s)."""
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.hf, n_vocab=self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return _one_text(self.hf.decode(ids, skip_special_tokens=True))

    def piece(self, token_id: int) -> str:
        p = self._pieces.get(token_id)
        if p is None:
            p = self._pieces[token_id] = _one_text(self.hf.decode([token_id]))
        return p

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the chat template writes it."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                "this model has no chat template in its metadata (a base model): send its prompts as text "
                "to /v1/completions, or serve a directory whose tokenizer has one.",
                "model",
            )
        return _one_text(
            self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
        )

    def apply_chat_template(self, messages: list[dict], **kwargs) -> list[int]:
        return self.encode(self.chat_text(messages, **kwargs))

    def encode_turns(
        self, messages: list[dict], tools: list[dict] | None = None
    ) -> list[tuple[list[int], list[int]]] | None:
        """The conversation tokenized turn by turn, as the trainer learns it and the server prompts
        with it: per message, (ids of what comes before its text: the template up to an assistant
        turn's header, else nothing), (ids of the rest of the turn). Tokenizing the pieces apart
        matters where BPE would merge across them (an answer that begins with whitespace after the
        header's newline): a model tuned on its turns must be prompted with the same ids. None if
        the template cannot be rendered turn by turn (each render must extend the previous)."""
        rendered = self._turns(messages, tools)
        return None if rendered is None else rendered[0]

    def encode_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A chat prompt ending in the assistant's header, tokenized turn by turn (encode_turns); a
        template that cannot be rendered so is tokenized whole. `tools`: for the template to offer."""
        rendered = self._turns(messages, tools)
        full = self.chat_text(messages, add_generation_prompt=True, **_tools(tools))
        if rendered is None or not full.startswith(rendered[1]):
            return self.encode(full)
        turns, done = rendered
        return [t for head, body in turns for t in head + body] + self.encode(full[len(done) :])

    def _turns(
        self, messages: list[dict], tools: list[dict] | None = None
    ) -> tuple[list[tuple[list[int], list[int]]], str] | None:
        """encode_turns' pieces and the text of the whole conversation they cover (None: see there)."""
        out, done = [], ""
        kw = _tools(tools)
        for j, m in enumerate(messages):
            before = self.chat_text(messages[:j], add_generation_prompt=m["role"] == "assistant", **kw) if j else ""
            after = self.chat_text(messages[: j + 1], add_generation_prompt=False, **kw)
            if not (before.startswith(done) and after.startswith(before)):
                return None
            out.append((self.encode(before[len(done) :]), self.encode(after[len(before) :])))
            done = after
        return out, done


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters.
    With a fast (Rust) tokenizer, PyPI tokenizers' DecodeStream does it, as vLLM does (~1 us a
    token); else the prefix/read offset scheme vLLM and TGI used before it (decode a short window,
    emit what is new; ~5 us a token here). The same text either way."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._rust = getattr(tokenizer.hf, "_tokenizer", None)
        self._stream = None
        if self._rust is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers older than 0.21
                self._rust = None
            else:
                self._stream = DecodeStream(skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        if self._stream is not None and self._rust is not None:
            return self._stream.step(self._rust, token_id) or ""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete character, or a special token that decodes to nothing
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(prefix) :]
