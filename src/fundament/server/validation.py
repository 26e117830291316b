"""A request body that does not validate, as OpenAI's 400: which field, what is wrong with it, in
the field's own path (`messages[0].role`). Used by the app's handler and by batch lines alike."""

from __future__ import annotations

import json

_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _param_from_loc(loc) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union-member and tag names are dropped."""
    out = ""
    for i, p in enumerate(loc):
        if (i == 0 and p in ("body", "query", "path")) or (
            isinstance(p, str) and (p in _TYPE_NAMES or any(c in p for c in "[(-"))
        ):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _describe(value) -> str:
    if isinstance(value, (str, int, float, bool, type(None))):
        return json.dumps(value)[:100]
    return type(value).__name__


def validation_error(errors) -> dict:
    """OpenAI's error body for a request that does not validate, naming the first bad field."""
    first = errors[0] if errors else {}
    kind, loc = first.get("type"), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        msg = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}). Send a JSON object."
        param = None
    elif loc == ("body",):  # no body, or JSON that is not an object
        got = "nothing" if kind == "missing" else _describe(first.get("input"))
        msg = f"The request body must be a JSON object with this endpoint's parameters (got {got})."
        param = None
    elif kind == "extra_forbidden":
        param = _param_from_loc(loc)
        msg = f"Unrecognized request argument supplied: {param}"
    elif kind == "lone_surrogate":
        param = (_param_from_loc(loc) or "") + first["ctx"]["path"]
        msg = (
            f"Invalid value for '{param}': it contains a lone UTF-16 surrogate ({first['ctx']['char']}), "
            "which is not valid Unicode. Send the text as valid UTF-8."
        )
    else:
        param = _param_from_loc(loc)
        same = [e for e in errors if _param_from_loc(e.get("loc", ())) == param]
        too_long = next((e for e in same if e.get("type") == "too_long"), None)
        if kind == "missing":
            msg = f"Missing required parameter: '{param}'."
        elif too_long is not None:  # a list over its limit, whichever shapes of a union it was tried as
            ctx = too_long.get("ctx", {})
            msg = f"'{param}' has {ctx.get('actual_length')} items; at most {ctx.get('max_length')} are allowed per request."
        elif len(same) > 1:  # a union: none of the accepted shapes matched
            msg = f"Invalid type for '{param}' (got {_describe(first.get('input'))}); see the API reference for the accepted shapes."
        else:
            msg = f"Invalid value for '{param}': {first.get('msg', 'invalid')} (got {_describe(first.get('input'))})."
    return {"error": {"message": msg, "type": "invalid_request_error", "param": param, "code": None}}
