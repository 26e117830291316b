"""Adaptation: prompting (classification with a probability per label, few-shot selection) and
fine-tuning (LoRA), with the one rendering of a conversation both share."""

from .classify import ClassificationResult, Classifier, Label, PromptOptions

__all__ = ["ClassificationResult", "Classifier", "Label", "PromptOptions"]
