"""harness.errors.warn_caller: a warning names the user's line, however many of the package's
layers the call went through. (Kept out of `make mutation`'s test selection: mutmut's trampoline
adds a frame between a mutated function and its caller, so exact locations differ there.)"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from harness import InfluenceEmbedder
from harness.errors import warn_caller
from harness.fastpaths import FastInfluenceEmbedder

from test_embed_api import _softmax_regression_loader


def _fit_warnings(embedder_class: type, line_offset: int = 1) -> tuple[list[warnings.WarningMessage], int]:
    torch.manual_seed(0)
    embedder = embedder_class(nn.Linear(4, 3).double(), None, 12, 11, progress=False, block_size=1)
    loader = _softmax_regression_loader(4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + line_offset
        embedder.fit(loader)
    return [w for w in record if "eigenpairs" in str(w.message)], line


def test_a_direct_call_warns_from_the_calling_line():
    with pytest.warns(RuntimeWarning, match="^checked$") as record:
        line = inspect.currentframe().f_lineno + 1
        warn_caller("checked", RuntimeWarning)
    (warning,) = record
    assert (warning.filename, warning.lineno) == (__file__, line)


@pytest.mark.parametrize("embedder_class", [InfluenceEmbedder, FastInfluenceEmbedder])
def test_fit_warnings_name_the_users_line_through_every_layer(embedder_class):
    """FastInfluenceEmbedder.fit reaches InfluenceEmbedder.fit through super(): a fixed stacklevel
    named harness/fastpaths.py there."""
    found, line = _fit_warnings(embedder_class)
    assert found, "the rank-deficient fit warns"
    assert all((w.filename, w.lineno) == (__file__, line) for w in found), [(w.filename, w.lineno) for w in found]
