"""The CUDA path equals the CPU path (runs only where a GPU is present; CI has none)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from harness import InfluenceEmbedder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("basis_device", [None, "cpu"])
def test_cuda_embeddings_equal_cpu_embeddings(mlp64, basis_device):
    kwargs = dict(arnoldi_dim=60, embedding_dim=12, seed=0, progress=False)
    cpu = InfluenceEmbedder(mlp64.model, **kwargs).fit(mlp64.loader("train"))
    gpu_model = copy.deepcopy(mlp64.model).cuda()
    gpu = InfluenceEmbedder(gpu_model, basis_device=basis_device, **kwargs).fit(mlp64.loader("train"))
    assert gpu.factors_.device.type == "cuda"
    np.testing.assert_allclose(gpu.eigenvalues_.numpy(), cpu.eigenvalues_.numpy(), rtol=1e-8)
    a = cpu.transform(mlp64.loader("test"))
    b = gpu.transform(mlp64.loader("test"))
    np.testing.assert_allclose(b @ b.T, a @ a.T, rtol=1e-5, atol=1e-6 * np.abs(a @ a.T).max())
