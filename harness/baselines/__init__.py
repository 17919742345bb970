"""Slice-discovery baselines with one interface: ``fit(embeddings, targets, pred_probs)``,
``predict_proba(...) -> (N, n_slices)`` scores, ``predict(...) -> (N,)`` slice or -1."""

from harness.baselines.domino import DominoSlicer
from harness.baselines.simple import ConfusionSlicer, KMeansSlicer, SlicerInputs, check_inputs
from harness.baselines.spotlight import SpotlightSlicer

__all__ = ["ConfusionSlicer", "DominoSlicer", "KMeansSlicer", "SlicerInputs", "SpotlightSlicer", "check_inputs"]
