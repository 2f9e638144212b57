"""Moments of a test run that an observer may watch: when the host blocks, and when a class is done.

``evaluate()`` keeps no clocks and writes no pictures; it calls these methods at the moments they
name, and a subclass decides what to do there (bench/ times the waits, ``test.py --save_vis``
draws a class's maps). Every method here does nothing, so observing costs nothing by default.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .evaluation import ClassScores  # noqa: F401 - annotations only

#: what the host can wait for in a test run: the loader's next batch, the device finishing a
#: class's queued batches (its scores copied to the host), the previous class's metrics
WAITS = ("loader", "device", "metrics")


class EvaluationHooks:
    """Called by ``evaluate()`` in this order: ``run_started``; per batch ``waiting("loader")``;
    per class ``waiting("device")``, then ``waiting("metrics")`` for the class before it and
    ``class_done`` for it (on the metrics thread); ``run_finished`` last. Hooks run on every rank;
    ``class_done`` only where the class's scores are gathered (rank 0)."""

    #: True where ``class_done`` needs a class's maps and masks even when only image metrics are asked
    needs_maps: bool = False

    def run_started(self) -> None:
        """Before anything else: the dataset scan, the text features and the loader's start follow."""

    def waiting(self, what: str) -> AbstractContextManager:
        """A context around each moment the host blocks on ``what`` (one of ``WAITS``)."""
        return nullcontext()

    def class_done(self, scores: "ClassScores", metrics: dict[str, float]) -> None:
        """A class is scored and measured (``metrics`` as in the results' per-class table)."""

    def run_finished(self) -> None:
        """Every class is measured; the results dict is returned next."""
