"""What a generation request may ask of the engine, checked before anything runs: the prompt's
length, the completion's token budget within the context window and the KV cache, and room in the
engine's queue. Errors name the request's own fields."""

from __future__ import annotations

from ..errors import ContextLengthExceededError, InvalidRequestError, QueueFullError
from ..registry import ServedGenerator


def completion_budget(
    lm: ServedGenerator, n_prompt: int, requested: int | None, prompt_param: str, max_param: str
) -> int:
    """The completion's max tokens: as requested if prompt and completion fit, else a 400 naming
    `max_param` (or `prompt_param` when the prompt alone is too long); unrequested, the model's
    default bounded by what is left of the window."""
    engine = lm.engine
    try:
        if requested is not None:
            engine.check_fits(n_prompt, requested)
            return requested
        room = min(engine.max_context, engine.config.kv_cache_tokens) - n_prompt
        if room < 1:
            engine.check_fits(n_prompt, 1)
        return min(lm.defaults.max_completion_tokens, room)
    except ContextLengthExceededError as e:  # the engine counts tokens; the request names the fields
        e.param = max_param if requested is not None and n_prompt < engine.max_context else prompt_param
        raise


def check_capacity(lm: ServedGenerator, n_sequences: int) -> None:
    """Refuse up front (429) what the engine's queue cannot take, before a stream's headers go out."""
    engine = lm.engine
    if len(engine.waiting) + n_sequences > engine.config.max_queue:
        raise QueueFullError(
            f"The server is busy: {len(engine.waiting)} requests are already waiting (limit {engine.config.max_queue}). Retry shortly."
        )


def check_prompt_length(lm: ServedGenerator, n_prompt: int, param: str) -> None:
    if n_prompt == 0:
        raise InvalidRequestError("The prompt is empty.", param)
    if n_prompt >= lm.engine.max_context:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {lm.engine.max_context} tokens, but the prompt has {n_prompt}.",
            param,
        )


def check_limit(limit: int, most: int) -> None:
    """A list's `limit` query parameter, 1..most."""
    if not 1 <= limit <= most:
        raise InvalidRequestError(f"limit must be between 1 and {most}, got {limit}.", "limit")
