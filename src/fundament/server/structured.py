"""Output constraints for chat and completions (`response_format`, vLLM's `structured_outputs` and
its deprecated `guided_*` names): which grammar to enforce, and the check of an output against a
schema the grammar could enforce only in part. Knows wire fields and JSON schemas; the grammar
engine itself is in engine/constraints.py."""

from __future__ import annotations

import json
from typing import Any

from ..engine.constraints import choice_grammar, json_schema_grammar, lark_grammar, regex_grammar
from ..errors import InvalidRequestError

# The request fields that constrain the output; a request gives at most one.
CONSTRAINTS = (
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


def output_grammar(req: Any) -> tuple[str | None, dict | None, str | None]:
    """The grammar a request's output constraint asks for (None: none), the schema to check the
    output against where `response_format` is enforced only in part, and the field that asked.
    Every other form is enforced whole or refused with a 400 naming what cannot be."""
    given = [k for k in CONSTRAINTS if getattr(req, k, None) is not None]
    if len(given) > 1:
        raise InvalidRequestError(f"Give at most one output constraint; got {', '.join(given)}.", given[1])
    if not given:
        return None, None, None
    field = given[0]
    if field == "response_format":
        grammar, partial = response_format_grammar(req.response_format)
        return grammar, partial, field if grammar is not None else None
    if field == "structured_outputs":
        so = req.structured_outputs
        kind = next(k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(so, k) is not None)
        kind = kind.rstrip("_")
        value, param = getattr(so, kind + "_" if kind == "json" else kind), f"structured_outputs.{kind}"
    else:
        kind, value, param = field.removeprefix("guided_"), getattr(req, field), field
    return _grammar(kind, value, param), None, field


def _grammar(kind: str, value: Any, param: str) -> str:
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, param)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"{param} is not a JSON schema: {e}", param) from None
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{param} must be a JSON schema object.", param)
        return json_schema_grammar(value, param)
    if kind == "regex":
        return regex_grammar(value, param)
    if kind == "choice":
        return choice_grammar(value, param)
    return lark_grammar(value, param)


def response_format_grammar(rf: dict | None, param: str = "response_format") -> tuple[str | None, dict | None]:
    """The grammar a `response_format` asks for (None for plain text), and the schema to check
    the output against when the grammar enforces it only in part. With `strict: true` a schema the
    grammar engine cannot enforce is a 400 naming the keyword; with `strict` false or absent it is
    enforced where it can be and the output validated: never silently ignored."""
    if not rf or rf.get("type") in (None, "text"):
        return None, None
    kind = rf.get("type")
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, param), None
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not spec.get("name"):
            raise InvalidRequestError("response_format.json_schema needs a name and a schema.", param)
        schema = spec.get("schema") or {"type": "object"}
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON object.", param)
        try:
            return json_schema_grammar(schema, param), None
        except InvalidRequestError:
            if spec.get("strict") is True:
                raise
            return json_schema_grammar(schema, param, lenient=True), schema
    raise InvalidRequestError(f"response_format type '{kind}' is not one of text, json_object, json_schema.", param)


def schema_refusal(text: str, schema: dict | None) -> str | None:
    """Why a finished output fails a schema that was enforced only in part (None when it
    validates). A cut-off output (finish_reason "length") is not judged, as OpenAI does not."""
    if schema is None:
        return None
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except json.JSONDecodeError as e:
        return f"The output is not valid JSON: {e}"
    except jsonschema.ValidationError as e:
        return f"The output does not validate against the schema: {e.message}"
    return None
