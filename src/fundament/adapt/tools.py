"""Function calling for chat models whose template knows no tools: the tools are described in
the system prompt, calls are written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(the Hermes/Qwen convention), and `tool_choice` decides what the grammar allows:

    none      plain text, no tools offered
    auto      the model may answer or call; calls are parsed from its text (not enforced)
    required  one call (or several with parallel_tool_calls), arguments enforced by the grammar
    {name}    exactly that function, arguments enforced

Serving and training share it: a model tuned on these calls is prompted with the same words.
Knows wire messages and JSON schemas; the engine sees only a grammar.
"""

from __future__ import annotations

import json
import re
import uuid

from ..errors import InvalidRequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*?\})\s*" + re.escape(CLOSE), re.S)


def functions(tools: list[dict] | None) -> list[dict]:
    out = []
    for i, t in enumerate(tools or []):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict) or not f.get("name"):
            raise InvalidRequestError(
                f"tools[{i}] must be {{type: 'function', function: {{name, description?, parameters?}}}}.",
                f"tools[{i}]",
            )
        out.append(f)
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools have duplicate function names.", "tools")
    return out


def resolve_choice(tool_choice, funcs: list[dict]) -> str | dict:
    """'none' | 'auto' | 'required' | the named function's dict."""
    if tool_choice is None:
        return "auto" if funcs else "none"
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not funcs:
            raise InvalidRequestError(f"tool_choice '{tool_choice}' needs tools.", "tool_choice")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function":
        raise InvalidRequestError(
            f'tool_choice must be \'none\', \'auto\', \'required\' or {{"type": "function", "function": {{"name": ...}}}}; got {json.dumps(tool_choice)[:100]}.',
            "tool_choice",
        )
    if not isinstance(name, str):
        raise InvalidRequestError(
            'tool_choice must name a function: {"type": "function", "function": {"name": ...}}.', "tool_choice"
        )
    match = [f for f in funcs if f["name"] == name]
    if not match:
        raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in tools.", "tool_choice")
    return match[0]


def system_prompt(funcs: list[dict]) -> str:
    lines = [
        "You can call these functions. To call one, answer with",
        f'{OPEN}{{"name": <function name>, "arguments": <arguments as JSON>}}{CLOSE}',
        "Functions:",
    ]
    for f in funcs:
        lines.append(
            json.dumps(
                {
                    "name": f["name"],
                    "description": f.get("description", ""),
                    "parameters": f.get("parameters") or {"type": "object"},
                }
            )
        )
    return "\n".join(lines)


def _call_schema(f: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_schema(choice: str | dict, funcs: list[dict], parallel: bool) -> dict:
    """The JSON the output must be when calls are enforced: a list of calls."""
    one = _call_schema(choice) if isinstance(choice, dict) else {"anyOf": [_call_schema(f) for f in funcs]}
    return {
        "type": "array",
        "items": one,
        "minItems": 1,
        **({} if parallel and not isinstance(choice, dict) else {"maxItems": 1}),
    }


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def enforced_calls(text: str) -> list[dict]:
    """Tool calls from enforced output (a JSON list of {name, arguments})."""
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
        }
        for c in json.loads(text)
    ]


def parse_calls(text: str, funcs: list[dict]) -> tuple[str | None, list[dict]]:
    """With tool_choice auto: the calls the model wrote, and what text is left."""
    names = {f["name"] for f in funcs}
    calls = []
    for m in _CALL.finditer(text):
        try:
            c = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(c, dict) and c.get("name") in names:
            calls.append(
                {
                    "id": new_call_id(),
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))},
                }
            )
    if not calls:
        return text, []
    rest = _CALL.sub("", text).strip()
    return (rest or None), calls


def render_assistant_calls(tool_calls: list[dict]) -> str:
    """An assistant turn's earlier calls, as the model is asked to write them."""
    return "\n".join(
        f"{OPEN}{json.dumps({'name': c['function']['name'], 'arguments': json.loads(c['function']['arguments'] or '{}')})}{CLOSE}"
        for c in tool_calls
    )
