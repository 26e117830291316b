"""One evaluation's settings (EvalConfig), mapped 1:1 to `fundament eval` flags and saved beside the
report it made. Keys are read from environment variables at run time and never saved.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import fundament_home
from ..errors import InvalidRequestError
from .strategies import LOCAL

SIZES = [0, 8, 32, 128, 512, 2048]


@dataclass
class EvalConfig:
    tasks: list[str]  # built-in names (sst2, trec, sms_spam) or task definition files
    strategies: list[str] = field(default_factory=lambda: list(LOCAL))
    sizes: list[int] = field(default_factory=lambda: list(SIZES))  # labelled training examples
    seeds: list[int] = field(default_factory=lambda: [0])  # several give error bars
    limit: int | None = None  # a seeded sample of this many test examples (None: the whole split)
    k: int = 8  # examples shown per input by few-shot prompting (at most the subset's size)
    example_format: str = "list"  # how few-shot prompts show them: listed in the system message, or "turns"
    model: str = "smollm2-135m-instruct"  # prompted, fine-tuned and probed
    embedding_model: str = "all-minilm-l6-v2"  # nearest examples and the embedding probe
    base_url: str | None = None  # a running fundament server; None: start one on 127.0.0.1
    vllm: bool = False  # the server this run starts serves the model on vLLM (`fundament serve --vllm`)
    api_key_env: str = "FUNDAMENT_API_KEY"  # where its key is, if it needs one
    remote_base_url: str | None = None  # any OpenAI-compatible server, for the remote-* strategies
    remote_model: str | None = None
    remote_api_key_env: str = "OPENAI_API_KEY"
    lora_epochs: str | int = "auto"  # the jobs API's n_epochs
    lora_r: int | None = None  # None: the trainer's default (16)
    keep_models: bool = False  # keep the ft: models the run trained (else deleted once scored)
    latency_sample: int = 20  # test examples classified one call each for latency p50/p95
    out: Path = Path("eval-report")
    cache_dir: Path | None = None  # None: $FUNDAMENT_HOME/evals
    data_dir: Path | None = None  # None: $FUNDAMENT_DATA or ../shared/data

    def __post_init__(self):
        self.out = Path(self.out)
        if not self.tasks:
            raise InvalidRequestError("give at least one task (--task).", "task")
        if any(n < 0 for n in self.sizes) or not self.sizes:
            raise InvalidRequestError(f"sizes must be non-negative numbers of examples, got {self.sizes}.", "sizes")
        if not self.seeds:
            raise InvalidRequestError("give at least one seed.", "seeds")
        if self.limit is not None and self.limit < 1:
            raise InvalidRequestError(f"limit must be at least 1, got {self.limit}.", "limit")
        if self.example_format not in ("list", "turns"):
            raise InvalidRequestError(
                f"example_format must be 'list' or 'turns', got {self.example_format!r}.", "example_format"
            )
        if self.vllm and self.base_url:
            raise InvalidRequestError(
                "--vllm starts a server on vLLM; with --base-url, start that server with `fundament serve --vllm`.",
                "vllm",
            )
        if self.lora_epochs != "auto":
            try:
                self.lora_epochs = int(self.lora_epochs)
            except ValueError:
                raise InvalidRequestError(
                    f"lora_epochs must be 'auto' or a number, got {self.lora_epochs!r}.", "lora_epochs"
                ) from None

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env)

    @property
    def remote_api_key(self) -> str | None:
        return os.environ.get(self.remote_api_key_env)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else fundament_home() / "evals"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(f"expected comma-separated numbers, got {text!r}", "sizes") from None


def add_arguments(p) -> None:
    """The `fundament eval` flags (argparse), one per EvalConfig field."""
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help="sst2, trec, sms_spam, or a task definition file (YAML/JSON; docs/evaluation.md); repeatable",
    )
    p.add_argument(
        "--strategies",
        default="local",
        help="comma-separated: zero-shot, few-shot-random, few-shot-nearest, lora, probe-embedding, probe-hidden, tfidf, remote-zero-shot, remote-few-shot-random, remote-few-shot-nearest; 'local' and 'remote' name the groups (default: local)",
    )
    p.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="numbers of labelled training examples (default %(default)s)"
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds; several give error bars (default 0)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of this many test examples")
    p.add_argument("--k", type=int, default=8, help="examples per input for few-shot prompting (default 8)")
    p.add_argument(
        "--example-format",
        choices=["list", "turns"],
        default="list",
        help="few-shot examples listed in the system message (default) or as chat turns",
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="the chat model to prompt, fine-tune and probe")
    p.add_argument("--embedding-model", default="all-minilm-l6-v2")
    p.add_argument(
        "--base-url",
        default=None,
        help="a running fundament server (default: start one on 127.0.0.1 and stop it after)",
    )
    p.add_argument(
        "--vllm",
        action="store_true",
        help="the server this run starts serves the model on vLLM (fundament serve --vllm; docs/scaling.md)",
    )
    p.add_argument(
        "--remote-base-url",
        default=None,
        help="an OpenAI-compatible API for the remote-* strategies, e.g. https://api.openai.com/v1",
    )
    p.add_argument("--remote-model", default=None, help="the remote model, e.g. gpt-4o-mini")
    p.add_argument(
        "--remote-api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the remote key (default %(default)s)",
    )
    p.add_argument("--lora-epochs", default="auto", help="n_epochs of the fine-tuning jobs (default auto)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the trainer's, 16)")
    p.add_argument(
        "--keep-models", action="store_true", help="keep the ft: models trained (default: delete each once scored)"
    )
    p.add_argument("--latency-sample", type=int, default=20, help="test examples timed one call each (default 20)")
    p.add_argument("--out", default="eval-report", help="the report directory (default %(default)s)")
    p.add_argument("--cache-dir", default=None, help="cached results and features (default $FUNDAMENT_HOME/evals)")
    p.add_argument(
        "--data-dir", default=None, help="the built-in tasks' data (default $FUNDAMENT_DATA or ../shared/data)"
    )


def from_args(args) -> EvalConfig:
    return EvalConfig(
        tasks=args.task,
        strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
        sizes=_ints(args.sizes),
        seeds=_ints(args.seeds),
        limit=args.limit,
        k=args.k,
        example_format=args.example_format,
        model=args.model,
        embedding_model=args.embedding_model,
        base_url=args.base_url,
        vllm=args.vllm,
        remote_base_url=args.remote_base_url,
        remote_model=args.remote_model,
        remote_api_key_env=args.remote_api_key_env,
        lora_epochs=args.lora_epochs,
        lora_r=args.lora_r,
        keep_models=args.keep_models,
        latency_sample=args.latency_sample,
        out=Path(args.out),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        data_dir=Path(args.data_dir) if args.data_dir else None,
    )
