"""fundament: serve, adapt and measure pretrained foundation models offline through the OpenAI API."""

__version__ = "0.1.0"


def __getattr__(name):  # heavy imports (torch) only when asked for
    if name in ("Classifier", "ClassificationResult", "Label"):
        from . import adapt

        return getattr(adapt, name)
    if name == "export":  # fundament.export("ft:...", "gguf", "out/"): docs/export.md
        from .registry import export

        return export
    raise AttributeError(name)
