"""The engine: token ids in, token ids out. Scheduling, KV caches, sampling, logits processing."""

from .engine import Engine
from .request import EngineOutput, EngineRequest, ScoreOutput
from .sampling import SamplingParams

__all__ = ["Engine", "EngineOutput", "EngineRequest", "SamplingParams", "ScoreOutput"]
