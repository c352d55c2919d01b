"""Evaluation: scores of a trained model's predictions (`eval.metrics`: classification and entity
scores, reports, confusion-matrix pictures). Imports nothing from llmkit but errors and utils."""
