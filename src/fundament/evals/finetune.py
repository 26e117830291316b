"""LoRA fine-tuning of the chat model through the Files and Fine-tuning jobs API, as a user would:
upload the training subset as chat examples with the official client, create a job, wait for
it, then score the test split with the `ft:` model through `/v1/classifications` (the same
instruction and answer prefix the examples were written in), so it gets probabilities too.
Knows the API only; the server's worker trains.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from ..adapt.prompt import PromptFormat
from ..config import fundament_home
from ..errors import FundamentError
from ..jobs.lifecycle import FINISHED, Status
from .measure import Outcome, PeakMemory, dir_size
from .prompting import classify, request_body
from .tasks import Example, Task

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.fine_tuning import FineTuningJob

MIN_EXAMPLES = 10  # the jobs API's minimum, as OpenAI's


def chat_examples(task: Task, train: list[Example]) -> bytes:
    """The training subset as chat JSONL: the classification endpoint's system message, the text,
    and the answer phrased as it is scored ("The review is positive")."""
    d = task.descriptions or {}
    fmt = PromptFormat(task.instruction, task.answer_prefix)
    labels = [(c, d.get(c, "")) for c in task.classes]
    lines = [
        json.dumps(
            {"messages": fmt.messages(labels, [], e.text) + [{"role": "assistant", "content": fmt.answer(e.label)}]}
        )
        for e in train
    ]
    return ("\n".join(lines) + "\n").encode()


class LoRA:
    name = "lora"
    uses_server = True
    min_size, max_size, at_zero = MIN_EXAMPLES, None, "zero-shot"  # no examples: the base model, zero-shot

    def settings(self, cfg) -> dict:
        return {"model": cfg.model, "n_epochs": cfg.lora_epochs, "lora_r": cfg.lora_r}

    def _wait(self, client: OpenAI, job: FineTuningJob, progress) -> FineTuningJob:
        seen_step = 0
        while job.status not in FINISHED:
            time.sleep(2)
            job = client.fine_tuning.jobs.retrieve(job.id)
            if progress and job.status == Status.RUNNING:
                events = client.fine_tuning.jobs.list_events(job.id, limit=20).data
                m = next((e.data for e in events if e.type == "metrics" and isinstance(e.data, dict) and e.data), None)
                if m and m.get("step", 0) > seen_step:
                    seen_step = m["step"]
                    progress(m["step"], m["total_steps"], "training")
        return job

    def _train_seconds(self, client: OpenAI, job: FineTuningJob, wall_s: float) -> float:
        """From the job's "started" event to its finish (what training took, queue and validation
        left out); our own clock where the events do not say."""
        events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
        started = [e.created_at for e in events if e.message.startswith("Fine-tuning job started")]
        if started and job.finished_at and job.finished_at > min(started):
            return float(job.finished_at - min(started))
        return wall_s

    def run(self, ctx, task: Task, train: list[Example], test: list[Example], seed: int) -> Outcome:
        cfg, client = ctx.config, ctx.fundament.client
        upload = client.files.create(
            file=(f"{task.name}-n{len(train)}-s{seed}.jsonl", chat_examples(task, train)), purpose="fine-tune"
        )
        hp = {} if cfg.lora_epochs == "auto" else {"n_epochs": int(cfg.lora_epochs)}
        worker = ctx.fundament.worker()  # the worker trains: its peak is the one that counts
        mem = PeakMemory(*worker).__enter__() if worker else None
        t0 = time.perf_counter()
        job = client.fine_tuning.jobs.create(
            model=cfg.model,
            training_file=upload.id,
            seed=seed,
            suffix=f"eval-{task.name}-n{len(train)}-s{seed}"[:64],
            method={"type": "supervised", "supervised": {"hyperparameters": hp}},
            extra_body={"lora_r": cfg.lora_r} if cfg.lora_r else None,
        )
        try:
            job = self._wait(client, job, ctx.progress)
        except (
            KeyboardInterrupt,
            SystemExit,
        ):  # the run stops (Ctrl-C, SIGTERM): so does its job (else a restarted server trains it)
            client.fine_tuning.jobs.cancel(job.id)
            raise
        wall_s = time.perf_counter() - t0
        peak = mem.read() if mem else None
        if job.status != Status.SUCCEEDED:
            why = job.error.message if job.error else job.status
            raise FundamentError(f"fine-tuning job {job.id} {job.status}: {why}", "lora")
        model = job.fine_tuned_model
        if model is None:
            raise FundamentError(f"fine-tuning job {job.id} succeeded without a fine_tuned_model", "lora")
        adapter = fundament_home() / "fine_tuning" / job.id / "adapter"  # where a server on this machine keeps it
        size = dir_size(adapter) if adapter.is_dir() else None
        saved = adapter / "fundament_tune.json"
        compiled = json.loads(saved.read_text()).get("compiled") if saved.is_file() else None
        train_s = self._train_seconds(client, job, wall_s)
        out = classify(
            client,
            request_body(task, model, [], 0, None, seed, input_prefix=False),
            test,
            cfg.latency_sample,
            ctx.progress,
        )
        out.train_s, out.peak_memory_mb, out.size_bytes = train_s, peak, size
        out.info = {
            "job": job.id,
            "fine_tuned_model": model,
            "trained_tokens": job.trained_tokens,
            "wall_s": wall_s,
            "hyperparameters": job.hyperparameters.model_dump() if job.hyperparameters else None,
            "compiled": compiled,
        }
        if not cfg.keep_models:  # the adapter and its checkpoints: tens of MB per run
            client.models.delete(model)
            client.files.delete(upload.id)
        return out
