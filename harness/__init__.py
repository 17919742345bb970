"""InfEmbed harness: slice discovery by clustering influence embeddings.

Public API::

    from harness import InfluenceEmbedder, kmeans_slices, rule_slices, slice_opponents
"""

from harness.embed import FactorConfig, InfluenceEmbedder
from harness.errors import InputError
from harness.slicing import (
    RuleConfig,
    RuleNode,
    kmeans_slices,
    opponents_per_slice,
    rule_slices,
    slice_influence,
    slice_opponents,
    slice_proponents,
    summarize_slices,
)
from harness.task import ClassificationTask, HuggingFaceClassificationTask, Task

__all__ = [
    "ClassificationTask",
    "FactorConfig",
    "HuggingFaceClassificationTask",
    "InfluenceEmbedder",
    "InputError",
    "RuleConfig",
    "RuleNode",
    "Task",
    "kmeans_slices",
    "opponents_per_slice",
    "rule_slices",
    "slice_influence",
    "slice_opponents",
    "slice_proponents",
    "summarize_slices",
]

__version__ = "0.1.0"
