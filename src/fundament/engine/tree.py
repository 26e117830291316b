"""A scoring request's tokens as one packed tree: the prompt once, then every continuation's tokens
with the prefixes continuations share stored once (a trie), so a prompt shared by several
continuations is prefilled once. Each packed token sits at its depth in the rotary embedding and
attends only to its ancestors (tree attention, as SpecInfer (Miao et al. 2024) verifies token
trees). Knows token ids and positions; nothing of the model or the scheduler.
"""

from __future__ import annotations

import torch


class TokenTree:
    def __init__(self, prompt_ids: list[int], continuations: list[list[int]]):
        assert prompt_ids, "a scoring request needs at least one prompt token"
        P = len(prompt_ids)
        self.n_prompt = P
        self.ids = list(prompt_ids)  # the packed tokens: prompt, then the trie's nodes
        parent: list[int] = []  # per trie node: the packed index of its parent
        depth: list[int] = []  # per trie node: its position in the sequence it belongs to
        children: dict[tuple[int, int], int] = {}  # (parent packed index, token) -> packed index
        self.paths: list[list[int]] = []  # per continuation: the packed index of each token
        for cont in continuations:
            at, path = P - 1, []
            for tok in cont:
                node = children.get((at, tok))
                if node is None:  # appended after its ancestors, so a causal chunking works
                    node = children[(at, tok)] = len(self.ids)
                    self.ids.append(tok)
                    parent.append(at)
                    depth.append(P if at == P - 1 else depth[at - P] + 1)
                path.append(node)
                at = node
            self.paths.append(path)
        self.parent = parent
        self.depth = max([P - 1, *depth]) + 1  # the longest sequence, in tokens
        self.positions = torch.cat([torch.arange(P), torch.tensor(depth, dtype=torch.long)])  # (L,)
        # The rows whose next-token distribution is read: each node's parent.
        self.children_of: dict[int, list[int]] = {}
        for i, p in enumerate(parent):
            self.children_of.setdefault(p, []).append(P + i)
        self.logprobs = [0.0] * len(self.ids)  # per packed token: log P(token | its ancestors)

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, start: int, length: int) -> torch.Tensor:
        """Which cache slots [0, start + length) each packed token in [start, start + length)
        attends to: the prompt causally, a trie node to the whole prompt and its own ancestors."""
        end, P = start + length, self.n_prompt
        m = torch.zeros(length, end, dtype=torch.bool)
        rows = torch.arange(start, end)
        prompt_rows = rows < P
        m[prompt_rows] = torch.arange(end)[None, :] <= rows[prompt_rows, None]
        if end > P:
            m[max(start, P) - start :, :P] = True
            node_rows: list[int] = []
            cols: list[int] = []
            for r in range(max(start, P), end):  # a node, then its parents up to the prompt
                a = r
                while a >= P:
                    node_rows.append(r - start)
                    cols.append(a)
                    a = self.parent[a - P]
            m[node_rows, cols] = True
        return m

    def read_rows(self, start: int, length: int) -> list[int]:
        """The packed indices in [start, start + length) whose logits are needed (parents)."""
        return [r for r in range(start, start + length) if r in self.children_of]

    def record(self, row: int, logprobs: torch.Tensor) -> None:
        """logprobs (V,): the log-softmax at packed index `row`; keeps its children's values."""
        for child in self.children_of[row]:
            self.logprobs[child] = float(logprobs[self.ids[child]])

    def results(self) -> list[list[float]]:
        return [[self.logprobs[i] for i in path] for path in self.paths]
