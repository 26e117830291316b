"""Training examples as token ids: a chat or prompt/completion record encoded as the server
prompts with it (labels on the learned assistant tokens only, OpenAI's `weight`), and packing
examples into rows. Knows the tokenizer, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError
from ..models.tokenizer import ChatTokenizer
from .chat import render_chat

IGNORE = -100  # the label of a position with no loss (PyTorch's cross-entropy ignore_index)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the next token to predict at each position, IGNORE where no loss

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_example(tokenizer: ChatTokenizer, record: dict, max_len: int) -> Example:
    """Token ids and labels for one training record (chat or prompt/completion format). The ids
    are built turn by turn exactly as the server prompts at inference (template up to the
    assistant's header, then the answer), and only learned assistant turns carry labels: their
    text and end-of-turn token. Raises ValueError saying what is wrong with the record."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    ids: list[int] = []
    learn_mask: list[bool] = []
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        try:
            chat = render_chat(msgs, record.get("tools"), template_tools=tokenizer.hermes_tools)  # as the server does
            msgs, learn = chat.messages, chat.learned
        except InvalidRequestError as e:  # one line's problem, listed with the file's others
            raise ValueError(e.message.rstrip(".")) from None
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("the example has no assistant message")
        if not learn:
            raise ValueError("every assistant message has weight 0: there is nothing to learn")
        eot = set(tokenizer.eos_token_ids)
        try:
            turns = tokenizer.encode_turns(msgs, chat.template_tools)  # as the server prompts with it (encode_prompt)
        except InvalidRequestError as e:  # a model without a chat template: chat examples cannot be rendered
            raise ValueError(e.message.rstrip(".")) from None
        if turns is None:
            raise ValueError("the model's chat template cannot render this conversation turn by turn")
        for j, (head, body) in enumerate(turns):
            ids += head + body
            learn_mask += [False] * len(head)
            if j in learn:  # the answer and its end-of-turn token; what follows it is the next turn's
                end = next((k + 1 for k, t in enumerate(body) if t in eot), len(body))
                learn_mask += [True] * end + [False] * (len(body) - end)
            else:
                learn_mask += [False] * len(body)
    elif "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise ValueError("a prompt/completion example needs a string 'prompt' and a non-empty string 'completion'")
        head, body = tokenizer.encode(p), tokenizer.encode(c) + tokenizer.eos_token_ids[:1]
        ids, learn_mask = head + body, [False] * len(head) + [True] * len(body)
    else:
        raise ValueError("an example needs 'messages' (chat format) or 'prompt' and 'completion'")
    if len(ids) > max_len:
        raise ValueError(f"the example is {len(ids)} tokens long, more than the model's context window of {max_len}")
    # position t predicts token t+1: a label at t when token t+1 is learned
    labels = [ids[t + 1] if learn_mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, labels)


def pack(examples: list[Example], row_tokens: int) -> list[list[Example]]:
    """First-fit-decreasing: rows of whole examples, each row at most row_tokens long (a longer
    example gets a row of its own). Rows are trained as one sequence with a block-diagonal mask."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -e.n_tokens):
        for i, r in enumerate(room):
            if ex.n_tokens <= r:
                rows[i].append(ex)
                room[i] -= ex.n_tokens
                break
        else:
            rows.append([ex])
            room.append(row_tokens - ex.n_tokens)
    return rows
