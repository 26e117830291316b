"""One rendering of a chat conversation, for serving and training alike: a model is prompted with
exactly the words it was tuned on. Wire messages (OpenAI's chat format, as plain dicts) in; the
messages a chat template reads, and which assistant turns a trainer learns from, out. Owns the
`developer` -> `system` rename, earlier tool calls and the tool prompt. Knows no tokenizer.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from ..errors import InvalidRequestError
from .tools import functions, render_assistant_calls, resolve_choice, system_prompt

ROLES = ("system", "developer", "user", "assistant", "tool")


class RenderedChat(NamedTuple):
    messages: list[dict]  # what the chat template reads: role and content (and tool_call_id)
    learned: list[int]  # indices in `messages` of the assistant turns a trainer learns (weight 1)
    functions: list[dict]  # the tools' function definitions
    tool_choice: str | dict  # 'none' | 'auto' | 'required' | the named function's dict
    # The tools for the chat template to describe itself (`tools=` of apply_chat_template), where
    # it does so in the convention the calls are parsed and enforced in; None: none offered, or
    # described in the system message instead.
    template_tools: list[dict] | None = None


def render_chat(
    messages: list[dict], tools: list[dict] | None = None, tool_choice=None, template_tools: bool = False
) -> RenderedChat:
    """The conversation as a chat template reads it. `developer` (OpenAI's new name for `system`)
    becomes `system`; earlier calls are written into their assistant turn as the model is asked to
    write them. Unless tool_choice is 'none', the tools are offered: by the chat template itself
    where `template_tools` (the model's template describes tools in the convention calls are
    parsed in: Qwen's, Hermes'), else described in the system message. Raises
    InvalidRequestError naming the field to fix."""
    funcs = functions(tools)
    choice = resolve_choice(tool_choice, funcs)
    out: list[dict] = []
    learned: list[int] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'.", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}] has unknown role {role!r} (use {', '.join(ROLES)}).", f"messages[{i}].role"
            )
        if role in ("user", "system", "developer") and m.get("content") is None:
            raise InvalidRequestError(f"messages[{i}] ({role}) has no content.", f"messages[{i}].content")
        d = {"role": "system" if role == "developer" else role, "content": _text(m.get("content"), i)}
        if m.get("tool_calls"):  # shown to the model as it is asked to write calls
            d["content"] = "\n".join(x for x in (d["content"], _calls(m["tool_calls"], i)) if x)
        if role == "tool" and not m.get("tool_call_id"):
            raise InvalidRequestError(
                f"messages[{i}] is a tool message without tool_call_id.", f"messages[{i}].tool_call_id"
            )
        if m.get("tool_call_id"):
            d["tool_call_id"] = m["tool_call_id"]
        weight = m.get("weight", 1)  # OpenAI's fine-tuning field: 0 shows a turn without learning it
        if weight not in (0, 1):
            raise InvalidRequestError(f"messages[{i}].weight must be 0 or 1, got {weight!r}.", f"messages[{i}].weight")
        if role == "assistant" and weight == 1:
            learned.append(len(out))
        out.append(d)
    if choice != "none" and template_tools:  # the template describes them, in its own words
        return RenderedChat(out, learned, funcs, choice, [{"type": "function", "function": f} for f in funcs])
    if choice != "none":  # the tools go into the system message
        prompt = system_prompt(funcs)
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
            learned = [j + 1 for j in learned]
    return RenderedChat(out, learned, funcs, choice)


def _text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"messages[{i}].content must be a string or a list of text parts.", f"messages[{i}].content"
        )
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if isinstance(kind, str) and kind != "text":  # never dropped silently: the answer would ignore what was sent
            raise InvalidRequestError(
                f"messages[{i}].content[{j}] is an {kind} part; this model reads text only. Send text parts.",
                f"messages[{i}].content[{j}]",
            )
        raise InvalidRequestError(
            f'messages[{i}].content[{j}] must be a text part: {{"type": "text", "text": ...}}.',
            f"messages[{i}].content[{j}]",
        )
    return "".join(p["text"] for p in content)


def _calls(calls, i: int) -> str:
    """An assistant turn's earlier calls, checked, as the model is asked to write them."""
    if not isinstance(calls, list):
        raise InvalidRequestError(
            f"messages[{i}].tool_calls must be a list of tool calls.", f"messages[{i}].tool_calls"
        )
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise InvalidRequestError(
                f'messages[{i}].tool_calls[{j}] must be {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": ...}}}}.',
                f"messages[{i}].tool_calls[{j}]",
            )
        try:
            json.loads(fn["arguments"] or "{}")
        except json.JSONDecodeError as e:
            raise InvalidRequestError(
                f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object as a string ({e.msg} at character {e.pos}).",
                f"messages[{i}].tool_calls[{j}].function.arguments",
            ) from None
    return render_assistant_calls(calls)
