"""The real-dcbench path, offline: a fixture problem written through dcbench's own API,
served in the bucket's layout from a loopback HTTP server, downloaded and evaluated."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness.compat import LegacyStackUnavailable, import_dcbench
from harness.errors import InputError
from harness.train import TrainConfig, train_model

try:
    dcbench = import_dcbench()
except LegacyStackUnavailable:
    dcbench = None

pytestmark = pytest.mark.skipif(dcbench is None, reason="dcbench 0.0.4 not installed (see harness/compat.py)")

PROBLEM_ID = "digits-rare-8"
HIDDEN = 32

if dcbench is not None:

    class DigitsClassifier(dcbench.common.modeling.Model):
        """A dcbench Model: MLP on 8x8 digits; its hidden layer is the 'activations' artifact.
        Defined at module level: the model artifact pickles the class by reference."""

        DEFAULT_CONFIG = {"hidden": HIDDEN, "num_classes": 2}

        def _set_model(self):
            hidden, classes = self.config["hidden"], self.config["num_classes"]
            self.model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))

        def forward(self, x):
            return self.model(x)


@pytest.fixture(scope="module")
def fixture_problem(tmp_path_factory):
    """A dcbench-style "rare" problem on real digits: label = digit >= 5, and 8s are left out
    of training, so the model errs on the test 8s (the ground-truth slice)."""
    from harness.dcbench.client import export_remote_layout, write_problem

    pixels, digit = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(digit))
    pixels, digit = (pixels[order] / 16).astype(np.float32), digit[order]
    targets = (digit >= 5).astype(np.int64)
    train, val, test = slice(0, 900), slice(900, 1350), slice(1350, None)
    keep = digit[train] != 8

    torch.manual_seed(0)
    model = DigitsClassifier({"hidden": HIDDEN, "num_classes": 2})
    loader = DataLoader(
        TensorDataset(torch.as_tensor(pixels[train][keep]), torch.as_tensor(targets[train][keep])),
        batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0),
    )
    train_model(model, loader, TrainConfig(epochs=30, lr=3e-3), progress=False)
    with torch.no_grad():
        inputs = torch.as_tensor(pixels)
        activations = model.model[1](model.model[0](inputs)).numpy()
        probs = torch.softmax(model(inputs), dim=1).numpy()
    ids = np.array([f"digit-{i}" for i in range(len(digit))])
    local = tmp_path_factory.mktemp("dcbench-written")
    write_problem(
        PROBLEM_ID, local,
        val={"id": ids[val], "target": targets[val], "probs": probs[val]},
        test={"id": ids[test], "target": targets[test], "probs": probs[test]},
        test_slices=(digit[test] == 8).astype(np.int64)[:, None],
        activations={"id": ids[900:], "act": activations[900:]},
        clip={"id": ids[900:], "emb": pixels[900:]},  # stand-in for CLIP: the raw pixels
        model=model,
        attributes={"n_pred_slices": 5, "slice_category": "rare", "dataset": "sklearn digits"},
    )
    remote = export_remote_layout(local, tmp_path_factory.mktemp("dcbench-bucket"))
    test_slice = digit[test] == 8
    errors = probs[test].argmax(1) != targets[test]
    return {"local": local, "remote": remote, "test_slice": test_slice, "errors": errors}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """Starts loopback HTTP servers over folders; all are shut down after the test."""
    servers = []

    def start(folder) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.timeout = 10
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_fixture_is_a_real_slice_problem(fixture_problem):
    """Not a ceiling test: the slice is ~10% of the test set and holds many, not all, errors."""
    in_slice, errors = fixture_problem["test_slice"], fixture_problem["errors"]
    assert 0.05 < in_slice.mean() < 0.15
    assert errors[in_slice].mean() > 0.5 > errors[~in_slice].mean()
    assert 0.3 < errors[in_slice].sum() / errors.sum() < 0.95


def test_run_dcbench_problem_downloads_and_evaluates(fixture_problem, serve, tmp_path):
    from harness.dcbench.client import METHODS, InfEmbedConfig, list_problems, load_problem, run_dcbench_problem

    url = serve(fixture_problem["remote"])
    cache = tmp_path / "cache"
    assert list(list_problems(remote_url=url, local_dir=cache, progress=False).index) == [PROBLEM_ID]
    results = run_dcbench_problem(
        PROBLEM_ID, remote_url=url, local_dir=cache, progress=False,
        infembed=InfEmbedConfig(arnoldi_dim=100, embedding_dim=25, n_clusters=10, scoring="soft"),
    )
    # Everything came over HTTP, unpacked into dcbench's local layout.
    assert _files(cache) == _files(fixture_problem["local"])
    assert results["_problem"]["head_agreement"] == 1.0
    for method in METHODS:
        metrics = results[method]
        assert set(metrics) == {"precision_at_10", "precision_at_25", "auroc", "best_precision_at_10",
                                "best_precision_at_25"}
        assert all(0.0 <= value <= 1.0 for value in metrics.values()), (method, metrics)
    # The planted slice is found far above its 10% base rate by the error-aware methods.
    for method in ("infembed", "domino_clip", "domino_activations"):
        assert results[method]["best_precision_at_10"] >= 0.7, (method, results[method])

    problem = load_problem(PROBLEM_ID, local_dir=cache, progress=False)  # now served from the local copy
    assert problem.test_slices.shape == (len(problem.test_ids), 1)
    assert problem.test_activations.shape == (len(problem.test_ids), HIDDEN)


def test_confusion_baseline_equals_dcbench_confusion_sdm(fixture_problem):
    import yaml
    from dcbench.tasks.slice_discovery import confusion_sdm

    from harness.baselines import ConfusionSlicer
    from harness.dcbench.client import _dcbench_config, load_problem
    from harness.dcbench.metrics import slice_metrics

    with _dcbench_config(fixture_problem["local"]) as config:
        with open(f"{config.local_dir}/slice_discovery/problems.yaml") as handle:
            (their_problem,) = yaml.load(handle, Loader=yaml.FullLoader)
        theirs = their_problem.evaluate(confusion_sdm(their_problem))
    problem = load_problem(PROBLEM_ID, local_dir=fixture_problem["local"], progress=False)
    slicer = ConfusionSlicer(problem.n_pred_slices).fit(None, problem.val_targets, problem.val_probs)
    ours = slice_metrics(problem.test_slices, slicer.predict_proba(None, problem.test_targets, problem.test_probs))
    for key in ("precision_at_10", "precision_at_25", "auroc"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key


def test_offline_without_mirror_is_a_clear_error_and_writes_nothing(tmp_path, serve):
    from harness.dcbench.client import DcbenchUnavailable, load_problem

    (tmp_path / "empty-bucket").mkdir()
    url = serve(tmp_path / "empty-bucket")  # a server with nothing on it
    cache = tmp_path / "cache"
    with pytest.raises(DcbenchUnavailable, match="cannot download .*problems.yaml.*DCBENCH_CONFIG"):
        load_problem(PROBLEM_ID, remote_url=url, local_dir=cache, progress=False)
    assert _files(cache) == []


def test_failed_artifact_download_leaves_no_partial_file(fixture_problem, serve, tmp_path):
    from harness.dcbench.client import DcbenchUnavailable, load_problem

    bucket = tmp_path / "bucket"
    shutil.copytree(fixture_problem["remote"], bucket)
    missing = next(bucket.rglob("clip.mk.tar.gz"))
    missing.unlink()
    cache = tmp_path / "cache"
    with pytest.raises(DcbenchUnavailable, match="clip.mk.tar.gz"):
        load_problem(PROBLEM_ID, remote_url=serve(bucket), local_dir=cache, progress=False)
    assert not any("clip" in name or name.endswith((".part", ".unpack")) for name in _files(cache))


def test_unknown_problem_and_method(fixture_problem):
    from harness.dcbench.client import load_problem, run_dcbench_problem

    with pytest.raises(InputError, match="no dcbench slice-discovery problem 'nope'"):
        load_problem("nope", local_dir=fixture_problem["local"], progress=False)
    with pytest.raises(InputError, match="methods"):
        run_dcbench_problem(PROBLEM_ID, methods=["spotlight"], local_dir=fixture_problem["local"], progress=False)


def test_activation_maps_are_pooled_and_must_fit_the_head():
    from harness.dcbench.client import _pooled, final_linear_layer

    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 3)))
    head = final_linear_layer(model)
    assert (head.in_features, head.out_features) == (8, 3)
    assert torch.equal(head.weight, model[2][1].weight)
    maps = np.random.default_rng(0).random((5, 8, 4, 4))
    np.testing.assert_allclose(_pooled(maps, 8, "test"), maps.mean(axis=(2, 3)), rtol=1e-6)
    with pytest.raises(InputError, match="last linear layer takes 8 inputs"):
        _pooled(np.zeros((5, 7)), 8, "test")
    with pytest.raises(InputError, match="no nn.Linear"):
        final_linear_layer(nn.Sequential(nn.ReLU()))
