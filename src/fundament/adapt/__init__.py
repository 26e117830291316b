"""Adaptation: prompting (classification, few-shot selection) and, later, tuning."""

from .classify import Classifier, ClassificationResult, Label

__all__ = ["Classifier", "ClassificationResult", "Label"]
