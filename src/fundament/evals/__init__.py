"""Evaluation: labelled tasks from the shared data, metrics, and reports comparing strategies."""
