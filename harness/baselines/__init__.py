"""Slice-discovery baselines with one interface: ``fit(embeddings, targets, pred_probs)``,
``predict_proba(...) -> (N, n_slices)`` scores, ``predict(...) -> (N,)`` slice or -1."""

from harness.baselines.domino import DominoSlicer
from harness.baselines.simple import ConfusionSlicer, KMeansSlicer, SlicerInputs, check_inputs

__all__ = ["ConfusionSlicer", "DominoSlicer", "KMeansSlicer", "SlicerInputs", "check_inputs"]
