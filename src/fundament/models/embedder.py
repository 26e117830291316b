"""Sentence embeddings from a sentence-transformers directory (all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ContextLengthExceededError, InvalidRequestError


class Embedder:
    def __init__(self, path: str | Path):
        from sentence_transformers import SentenceTransformer

        if not (Path(path) / "modules.json").exists():
            raise InvalidRequestError(f"{path} is not a sentence-transformers directory (no modules.json)", "model")
        self.st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.dimensions = self.st.get_embedding_dimension()
        self.max_tokens: int | None = self.st.max_seq_length  # None: the model states no limit
        self.tokenizer = self.st.tokenizer
        self.vocab_size = len(self.tokenizer)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors for texts (normalised as the model's own pipeline does) and the tokens used."""
        n_tokens = 0
        for i, t in enumerate(texts):
            n = self.count_tokens(t)
            if self.max_tokens is not None and n > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input[{i}] has {n} tokens; this model reads at most {self.max_tokens}. Shorten the text.",
                    "input",
                )
            n_tokens += n
        vecs = self.st.encode(texts, convert_to_numpy=True, batch_size=32, show_progress_bar=False)
        return vecs.tolist(), n_tokens

    @torch.inference_mode()
    def vectors(self, texts: list[str]) -> np.ndarray:
        """Unit-length vectors (len(texts), D) as float32, for nearest-neighbour search over large
        pools; a text past the model's limit is truncated to its first max_tokens tokens."""
        return self.st.encode(
            texts, convert_to_numpy=True, batch_size=64, normalize_embeddings=True, show_progress_bar=False
        ).astype(np.float32)

    @torch.inference_mode()
    def embed_token_ids(self, batches: list[list[int]], first_index: int = 0) -> tuple[list[list[float]], int]:
        """Vectors for inputs already tokenized with this model's tokenizer (OpenAI's token-array
        input); `first_index`: the request's index of batches[0], for error messages."""
        out, n_tokens = [], 0
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        for i, ids in enumerate(batches, first_index):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"input[{i}] has token id {bad[0]} outside this model's vocabulary (0..{self.vocab_size - 1})",
                    "input",
                )
            if ids and cls_id is not None and ids[0] != cls_id:
                ids = [cls_id] + ids + [sep_id]
            if self.max_tokens is not None and len(ids) > self.max_tokens:
                raise ContextLengthExceededError(
                    f"input[{i}] has {len(ids)} tokens; this model reads at most {self.max_tokens}.", "input"
                )
            t = torch.tensor([ids])
            features = {"input_ids": t, "attention_mask": torch.ones_like(t), "token_type_ids": torch.zeros_like(t)}
            out.append(self.st.forward(features)["sentence_embedding"][0].tolist())
            n_tokens += len(ids)
        return out, n_tokens
