"""Passes: pure Graph -> Graph rewrites, run in one ordered pipeline (pipeline.py)."""

from .pipeline import Pass, default_pipeline, run_pipeline

__all__ = ["Pass", "default_pipeline", "run_pipeline"]
