"""`response_format` for chat and completions: which grammar to enforce, and the check of an
output against a schema the grammar could enforce only in part. Knows wire fields and JSON
schemas; the grammar engine itself is in engine/constraints.py."""

from __future__ import annotations

import json

from ..engine.constraints import json_schema_grammar
from ..errors import InvalidRequestError


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
