"""The names fine-tuning gives what it makes: the organization, `ft:` model ids and their checkpoints.

Pure functions of a job's row, shared by the worker (which names the model it trains), the store's
callers and the server (which reports the organization). Knows nothing of SQL, HTTP or training.
"""

from __future__ import annotations

ORGANIZATION = "fundament"
ORGANIZATION_ID = f"org-{ORGANIZATION}"  # a job's organization_id, as OpenAI reports it


def fine_tuned_model_id(job: dict) -> str:
    """ft:<base>:<org>:<suffix>:<id> as OpenAI names them (an empty suffix leaves '::')."""
    return f"ft:{job['model']}:{ORGANIZATION}:{job['suffix'] or ''}:{job['id'].removeprefix('ftjob-')}"


def checkpoint_model_id(fine_tuned_model: str, step: int) -> str:
    """A checkpoint's model id: its job's model id and the step, as OpenAI names them. The registry
    relies on this prefix to unload a model's checkpoints with the model."""
    return f"{fine_tuned_model}:ckpt-step-{step}"
