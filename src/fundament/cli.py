"""The `fundament` command: thin commands that call the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from .config import AdapterSpec, ServeConfig
from .errors import FundamentError


def _serve(args) -> None:
    import uvicorn

    from .engine.engine import reserve_cpu_for_engines
    from .models.registry import ModelRegistry, spec_from_path
    from .server.app import create_app

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
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
    if args.max_body_bytes:
        cfg.max_body_bytes = args.max_body_bytes
    t0 = time.perf_counter()
    reserve_cpu_for_engines()
    registry = ModelRegistry(cfg)
    registry.load_all()  # before binding the port: a model that cannot load is a one-line error
    logging.getLogger("fundament").info("models loaded in %.1fs; serving on http://%s:%d/v1", time.perf_counter() - t0, cfg.host, cfg.port)
    app = create_app(cfg, registry)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=args.log_level)


def _classify(args) -> None:
    """Classify lines of a file (or arguments) and print label and probabilities as JSON lines."""
    import asyncio
    import json
    from pathlib import Path

    from .adapt import Classifier
    from .engine.engine import reserve_cpu_for_engines
    from .models.registry import ModelRegistry

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
        lm, _ = registry.generator(args.model)
        embedder = next(iter(registry.embedders.values())).embedder if registry.embedders else None
        results = asyncio.run(Classifier(lm, embedder).classify(
            texts, args.labels.split(","), args.instruction, examples or None, args.k, args.selection, args.calibrate, args.seed, args.answer_prefix,
        ))
    finally:
        registry.stop()
    for text, r in zip(texts, results):
        print(json.dumps({"input": text, "label": r.label, "probabilities": r.probabilities}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fundament", description="Serve, adapt and measure foundation models offline.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve models through the OpenAI HTTP API")
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument("--config", help="YAML config file (see docs/configuration.md)")
    s.add_argument("--model", action="append", help="serve a local model by path: GGUF file, HF or sentence-transformers directory (repeatable)")
    s.add_argument("--no-default-models", action="store_true", help="serve only the models given with --model")
    s.add_argument("--alias", action="append", help="NAME=MODEL, e.g. gpt-4o-mini=smollm2-135m-instruct (repeatable)")
    s.add_argument("--lora", action="append", help="NAME=PATH: serve a PEFT LoRA directory as model NAME on the first generation model (repeatable)")
    s.add_argument("--api-key", action="append", help="require this API key (repeatable; or set FUNDAMENT_API_KEY)")
    s.add_argument("--max-body-bytes", type=int, default=None, help="largest request body accepted (default 8 MiB)")
    s.add_argument("--log-level", default="info")
    c = sub.add_parser("classify", help="classify texts by prompting, with a probability per label")
    c.add_argument("text", nargs="*", help="texts to classify")
    c.add_argument("--file", help="a file with one text per line")
    c.add_argument("--labels", required=True, help="comma-separated labels, e.g. positive,negative")
    c.add_argument("--instruction", help="the task, e.g. 'Classify the sentiment of the review.'")
    c.add_argument("--examples", help="JSONL file of {\"input\", \"label\"} examples for few-shot prompting")
    c.add_argument("--k", type=int, default=None, help="examples per input (default: all)")
    c.add_argument("--selection", choices=["nearest", "random"], default="nearest")
    c.add_argument("--calibrate", action="store_true", help="content-free calibration (Zhao et al. 2021)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--answer-prefix", default="Answer:", help="how the answer starts before the label")
    c.add_argument("--model", default="smollm2-135m-instruct")
    c.add_argument("--config", help="YAML config file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            _serve(args)
        elif args.command == "classify":
            _classify(args)
    except FundamentError as e:
        print(f"fundament: {e.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
