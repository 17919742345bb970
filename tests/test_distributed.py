"""Two gloo processes on loopback give the factors and embeddings of one process."""

from __future__ import annotations

import datetime
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import InfluenceEmbedder
from harness import distributed

KWARGS = dict(arnoldi_dim=40, embedding_dim=10, seed=0, progress=False)


def _problem():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:300] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:300])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), TensorDataset(x[:200], y[:200]), TensorDataset(x[200:], y[200:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, fail_rank):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    try:
        if rank == fail_rank:
            raise SystemExit(3)  # a rank that dies before its first collective
        torch.set_num_threads(1)
        model, train, test = _problem()
        embedder = InfluenceEmbedder(model, **KWARGS)
        # uneven shards (and a batch size that splits them differently) on purpose
        embedder.fit(DataLoader(distributed.shard(train), batch_size=33))
        emb = embedder.transform(DataLoader(distributed.shard(test), batch_size=17))
        np.savez(f"{out_dir}/rank{rank}.npz", eigenvalues=embedder.eigenvalues_.numpy(), embeddings=emb)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path), -1), nprocs=2, join=True, start_method="spawn")
    model, train, test = _problem()
    single = InfluenceEmbedder(model, **KWARGS).fit(DataLoader(train, batch_size=50))
    expected = single.transform(DataLoader(test, batch_size=50))
    for rank in range(2):
        got = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_allclose(got["eigenvalues"], single.eigenvalues_.numpy(), rtol=1e-5)
        # eigenvectors are defined up to sign; compare influences, which are sign-free. Entries span
        # orders of magnitude (max ~0.6, median ~1e-4), so the bound is relative to the largest one.
        influences = expected @ expected.T
        np.testing.assert_allclose(
            got["embeddings"] @ got["embeddings"].T, influences, rtol=0, atol=1e-5 * np.abs(influences).max()
        )


def test_a_dead_rank_fails_the_job_instead_of_hanging(tmp_path):
    port = _free_port()
    with pytest.raises(Exception):
        mp.start_processes(_worker, args=(2, port, str(tmp_path), 1), nprocs=2, join=True, start_method="spawn")
    assert not list(tmp_path.glob("*.npz"))
