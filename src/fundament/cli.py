"""The `fundament` command: thin commands that call the library."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from .config import AdapterSpec, ServeConfig, VLLMSpec
from .errors import FundamentError

SHUTDOWN_GRACE_S = 3  # seconds `fundament serve` lets requests in flight finish after SIGTERM


def _serve(args) -> None:
    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()  # a wrong file fails before torch loads

    import uvicorn

    from .engine.engine import reserve_cpu_for_engines
    from .registry import ModelRegistry, spec_from_path
    from .server.app import create_app

    cfg.host = args.host or cfg.host
    cfg.port = args.port or cfg.port
    keys = args.api_key or ([os.environ["FUNDAMENT_API_KEY"]] if os.environ.get("FUNDAMENT_API_KEY") else [])
    if keys:
        cfg.api_keys = keys
    if args.model:
        extra = [spec_from_path(p) for p in args.model]
        cfg.models = ([] if args.no_default_models else cfg.models) + extra
    for a in args.alias or []:
        name, _, target = a.partition("=")
        if not target:
            raise FundamentError(f"--alias must look like NAME=MODEL, got {a!r}", "alias")
        cfg.aliases[name] = target
    for spec in args.lora or []:
        name, _, path = spec.partition("=")
        if not path:
            raise FundamentError(f"--lora must look like NAME=PATH, got {spec!r}", "lora")
        base = next((m.name for m in cfg.models if m.task == "generate"), None)
        cfg.adapters.append(AdapterSpec(name=name, path=path, base=base or ""))
    _vllm_flags(cfg, args)
    if args.max_body_bytes:
        cfg.max_body_bytes = args.max_body_bytes
    if args.max_file_bytes:
        cfg.max_file_bytes = args.max_file_bytes
    t0 = time.perf_counter()
    reserve_cpu_for_engines()
    registry = ModelRegistry(cfg)
    registry.load_all()  # before binding the port: a model that cannot load is a one-line error
    logging.getLogger("fundament").info(
        "models loaded in %.1fs; serving on http://%s:%d/v1", time.perf_counter() - t0, cfg.host, cfg.port
    )
    worker = None
    if not args.no_worker:  # the app starts it once the models are loaded (the worker reuses their cache)
        from .jobs.supervisor import WorkerProcess

        worker = WorkerProcess(cfg, log_level=args.log_level)
    app = create_app(cfg, registry, worker)
    # On SIGTERM uvicorn waits for requests in flight; past this it cancels them (their engine work
    # is aborted with them), so a server with long generations running still stops within seconds.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


def _vllm_flags(cfg: ServeConfig, args) -> None:
    """--vllm / --vllm-url: the generation models are served by vLLM (docs/scaling.md)."""
    if not (args.vllm or args.vllm_url or args.vllm_python or args.vllm_arg):
        return
    gen = [m for m in cfg.models if m.task == "generate"]
    if args.vllm_url and len(gen) > 1:
        raise FundamentError(
            f"--vllm-url names one server but {len(gen)} generation models are served; give each its "
            "`vllm: {url: ...}` in a config file instead",
            "vllm-url",
        )
    for m in gen:  # over what a config file's vllm: section says, not instead of it
        spec = m.vllm or VLLMSpec()
        spec.url = args.vllm_url or spec.url
        spec.python = args.vllm_python or spec.python
        spec.args = [*spec.args, *(args.vllm_arg or [])]
        m.vllm = spec


def _worker(args) -> int:
    from .jobs.supervisor import worker_env

    os.environ.update(worker_env())  # before torch loads: OpenMP reads it once
    from .jobs.worker import main as worker_main

    return worker_main([*(["--config", args.config] if args.config else []), "--log-level", args.log_level])


def _client(args):
    try:
        from openai import OpenAI
    except ImportError:
        raise FundamentError(
            "this command talks to the server through the official client: pip install openai", "openai"
        ) from None

    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1"
    return OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "fundament", max_retries=2)


def _jobs(args) -> int:
    """fundament jobs list|show|events|cancel: a running server's fine-tuning jobs."""
    client = _client(args)
    if args.action == "list":
        for j in client.fine_tuning.jobs.list(limit=args.limit).data:
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(j.created_at))
            print(f"{j.id}  {created}  {j.status:<16}  {j.fine_tuned_model or j.model}")
        return 0
    if not args.job_id:
        raise FundamentError(f"fundament jobs {args.action} needs a job id", "job_id")
    if args.action == "show":
        print(client.fine_tuning.jobs.retrieve(args.job_id).model_dump_json(indent=2))
    elif args.action == "events":
        events = client.fine_tuning.jobs.list_events(args.job_id, limit=args.limit).data
        for e in reversed(events):
            print(f"{time.strftime('%H:%M:%S', time.localtime(e.created_at))} {e.level:5} {e.message}")
    elif args.action == "cancel":
        print(f"{args.job_id}: {client.fine_tuning.jobs.cancel(args.job_id).status}")
    return 0


def _tune(args) -> int:
    """Upload, create the job, follow it with a progress bar, plot the loss curve, print the model."""
    from pathlib import Path

    from .jobs.lifecycle import Status
    from .jobs.progress import follow, plot_loss_curve

    client = _client(args)
    paths = [Path(p) for p in [args.data, args.validation] if p]
    for p in paths:
        if not p.is_file():
            raise FundamentError(f"{p}: no such file", "data")
    uploaded = [client.files.create(file=(p.name, p.read_bytes()), purpose="fine-tune").id for p in paths]
    hp = {
        k: v
        for k, v in (
            ("n_epochs", args.n_epochs),
            ("batch_size", args.batch_size),
            ("learning_rate_multiplier", args.learning_rate_multiplier),
        )
        if v is not None
    }
    extra = {
        k: v
        for k, v in (
            ("lora_r", args.lora_r),
            ("lora_alpha", args.lora_alpha),
            ("nproc_per_node", args.nproc_per_node),
            ("nnodes", args.nnodes),
            ("distributed", args.distributed),
        )
        if v is not None
    }
    job = client.fine_tuning.jobs.create(
        model=args.model,
        training_file=uploaded[0],
        validation_file=uploaded[1] if len(uploaded) > 1 else None,
        suffix=args.suffix,
        seed=args.seed,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        extra_body=extra or None,
    )
    print(f"job {job.id} created; `fundament jobs cancel {job.id}` stops it")
    try:
        job, metrics = follow(client, job.id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. `fundament jobs show {job.id}` tells how it went.")
        return 130
    if metrics:
        png = plot_loss_curve(metrics, args.plot or f"{job.id}-loss.png", title=job.fine_tuned_model or job.id)
        print(f"loss curve: {png}")
    if job.status != Status.SUCCEEDED:
        msg = job.error.message if job.error else job.status
        print(f"fundament: the job {job.status}: {msg}", file=sys.stderr)
        return 1
    print(job.fine_tuned_model)
    return 0


def _export(args) -> int:
    from .registry import export

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    written = export(args.model, args.format, args.out, args.quantization, cfg)
    for p in written:
        print(p)
    use = {
        "peft": f"PEFT: PeftModel.from_pretrained(base, '{args.out}'); vLLM: --enable-lora --lora-modules NAME={args.out}",
        "merged": f"transformers: AutoModelForCausalLM.from_pretrained('{args.out}'); vLLM: vllm serve {args.out}",
        "gguf": f"llama.cpp: llama-server -m {written[0]}; Ollama: cd {args.out} && ollama create NAME -f Modelfile",
    }[args.format]
    print(use)
    return 0


def _classify(args) -> None:
    """Classify lines of a file (or arguments) and print label and probabilities as JSON lines."""
    import asyncio
    import json
    from pathlib import Path

    from .adapt import Classifier, PromptOptions
    from .engine.engine import reserve_cpu_for_engines
    from .registry import ModelRegistry

    texts = list(args.text)
    if args.file:
        texts += [line.rstrip("\n") for line in Path(args.file).read_text().splitlines() if line.strip()]
    if not texts:
        raise FundamentError("nothing to classify: give TEXT arguments or --file", "text")
    examples = []
    if args.examples:
        for i, line in enumerate(Path(args.examples).read_text().splitlines(), 1):
            if line.strip():
                try:
                    examples.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FundamentError(f"{args.examples} line {i}: not JSON ({e})", "examples") from e
    reserve_cpu_for_engines()
    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    registry = ModelRegistry(cfg)
    registry.load_all()
    registry.start()
    try:
        registry.wait_ready()  # a model on vLLM: its server started above
        lm, _ = registry.resolve_generator(args.model)
        embedder = next(iter(registry.embedders.values())).embedder if registry.embedders else None
        options = PromptOptions(
            args.instruction, examples or None, args.k, args.selection, args.seed, args.answer_prefix
        )
        results = asyncio.run(Classifier(lm, embedder).classify(texts, args.labels.split(","), options, args.calibrate))
    finally:
        registry.stop()
    for text, r in zip(texts, results):
        print(json.dumps({"input": text, "label": r.label, "probabilities": r.probabilities}))


def _eval(args) -> int:
    """Compare strategies on tasks and write the report directory (docs/evaluation.md)."""
    from .evals.config import from_args
    from .evals.runner import evaluate

    cfg = from_args(args)
    # SIGTERM (a `kill` of a long run) unwinds like Ctrl-C, so the server the run started is stopped
    # too; by default it would end this process at once and leave that server running.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        results = evaluate(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(cfg.out / "report.md")
    if results[
        "errors"
    ]:  # the report is written, but it is not the one asked for: a script must not take it for a success
        n = len(results["errors"])
        print(
            f"fundament: {n} of {n + results['cells']} cells failed (listed in {cfg.out / 'report.md'}); "
            "running the same command again retries them",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fundament", description="Serve, adapt and measure foundation models offline."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve models through the OpenAI HTTP API")
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--config", help="YAML config file (see docs/configuration.md)")
    s.add_argument(
        "--model",
        action="append",
        help="serve a local model by path: GGUF file, HF or sentence-transformers directory (repeatable)",
    )
    s.add_argument("--no-default-models", action="store_true", help="serve only the models given with --model")
    s.add_argument("--alias", action="append", help="NAME=MODEL, e.g. gpt-4o-mini=smollm2-135m-instruct (repeatable)")
    s.add_argument(
        "--lora",
        action="append",
        help="NAME=PATH: serve a PEFT LoRA directory as model NAME on the first generation model (repeatable)",
    )
    s.add_argument("--api-key", action="append", help="require this API key (repeatable; or set FUNDAMENT_API_KEY)")
    s.add_argument("--max-body-bytes", type=int, default=None, help="largest request body accepted (default 8 MiB)")
    s.add_argument(
        "--max-file-bytes", type=int, default=None, help="largest file accepted by POST /v1/files (default 512 MiB)"
    )
    s.add_argument(
        "--no-worker", action="store_true", help="do not start the fine-tuning worker (run `fundament worker` apart)"
    )
    s.add_argument("--vllm", action="store_true", help="serve the generation models on vLLM servers started here")
    s.add_argument("--vllm-url", help="serve the generation model on the vLLM server at this URL")
    s.add_argument("--vllm-python", help="the Python of vLLM's environment (default .venv-vllm, `make vllm-env`)")
    s.add_argument(
        "--vllm-arg",
        action="append",
        help="one more flag for the vLLM server started here, as --vllm-arg=--enforce-eager (repeatable)",
    )
    s.add_argument("--log-level", default="info")
    w = sub.add_parser(
        "worker", help="train the fine-tuning jobs queued in $FUNDAMENT_HOME (fundament serve starts one)"
    )
    w.add_argument("--config", help="YAML config file naming the base models (as for serve)")
    w.add_argument("--log-level", default="info")
    j = sub.add_parser("jobs", help="list, show, follow or cancel a running server's fine-tuning jobs")
    j.add_argument("action", choices=["list", "show", "events", "cancel"])
    j.add_argument("job_id", nargs="?")
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--base-url", help="the server's API (default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)")
    t = sub.add_parser("tune", help="fine-tune a model on a JSONL file through a running server, with live progress")
    t.add_argument("data", help="training data: JSONL, chat or prompt/completion format (docs/fine-tuning.md)")
    t.add_argument("--model", required=True, help="the base model, e.g. smollm2-135m-instruct")
    t.add_argument("--validation", help="validation data (JSONL)")
    t.add_argument("--suffix", help="up to 64 characters in the model's name")
    t.add_argument("--n-epochs", type=int, default=None, help="default: auto")
    t.add_argument("--batch-size", type=int, default=None, help="default: auto")
    t.add_argument("--learning-rate-multiplier", type=float, default=None, help="default: auto (1.0)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 16)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 32)")
    t.add_argument(
        "--nproc-per-node", type=int, default=None, help="training processes (torchrun); default: the worker's"
    )
    t.add_argument("--nnodes", type=int, default=None, help="nodes of a torchrun job; default: the worker's")
    t.add_argument("--distributed", choices=["ddp", "fsdp"], default=None, help="with several processes; default: ddp")
    t.add_argument("--plot", help="where to write the loss curve (default <job id>-loss.png)")
    t.add_argument("--base-url", help="the server's API (default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)")
    x = sub.add_parser(
        "export", help="export a model (ft:, adapter or base) for transformers, vLLM, llama.cpp or Ollama"
    )
    x.add_argument("model", help="a fine-tuned ft: model or checkpoint, a configured adapter, or a base model")
    x.add_argument("--format", required=True, choices=["peft", "merged", "gguf"])
    x.add_argument("--out", required=True, help="a new (or empty) directory")
    x.add_argument("--quantization", choices=["f16", "q8_0"], default="f16", help="for gguf (default f16)")
    x.add_argument("--config", help="the serve config naming the models (default: the default models)")
    c = sub.add_parser("classify", help="classify texts by prompting, with a probability per label")
    c.add_argument("text", nargs="*", help="texts to classify")
    c.add_argument("--file", help="a file with one text per line")
    c.add_argument("--labels", required=True, help="comma-separated labels, e.g. positive,negative")
    c.add_argument("--instruction", help="the task, e.g. 'Classify the sentiment of the review.'")
    c.add_argument("--examples", help='JSONL file of {"input", "label"} examples for few-shot prompting')
    c.add_argument("--k", type=int, default=None, help="examples per input (default: all)")
    c.add_argument("--selection", choices=["nearest", "random"], default="nearest")
    c.add_argument("--calibrate", action="store_true", help="content-free calibration (Zhao et al. 2021)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--answer-prefix", default="Answer:", help="how the answer starts before the label")
    c.add_argument("--model", default="smollm2-135m-instruct")
    c.add_argument("--config", help="YAML config file")
    from .evals.config import add_arguments as add_eval_arguments

    add_eval_arguments(
        sub.add_parser(
            "eval", help="prompting vs fine-tuning vs small models on a task: a report with tables and plots"
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    quiet = args.command in ("jobs", "tune", "eval")  # client commands: their output is the answer, not logs
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "classify":
            _classify(args)
        elif args.command == "jobs":
            return _jobs(args)
        elif args.command == "tune":
            return _tune(args)
        elif args.command == "export":
            return _export(args)
        elif args.command == "eval":
            return _eval(args)
    except FundamentError as e:
        print(f"fundament: {e.message}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.command not in ("jobs", "tune", "eval"):
            raise
        import openai

        if isinstance(e, openai.APIConnectionError):
            print(
                f"fundament: cannot reach the server ({e}); is `fundament serve` running? (--base-url)", file=sys.stderr
            )
        elif isinstance(e, openai.APIStatusError):
            print(f"fundament: {e.status_code}: {e.message}", file=sys.stderr)
        else:
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
