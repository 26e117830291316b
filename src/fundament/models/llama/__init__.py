"""A Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) in plain PyTorch, built for the engine:
its configuration, linear layers, KV caches, weight reading and the model."""

from .cache import KVCache, Segment
from .config import SUPPORTED_ARCHITECTURES, LlamaConfig
from .linear import INT4_GROUP, Linear
from .model import NATIVE_DENSE, NATIVE_INT4, NATIVE_INT8, LlamaModel

__all__ = [
    "INT4_GROUP",
    "KVCache",
    "Linear",
    "LlamaConfig",
    "LlamaModel",
    "NATIVE_DENSE",
    "NATIVE_INT4",
    "NATIVE_INT8",
    "SUPPORTED_ARCHITECTURES",
    "Segment",
]
