"""The command line (`python -m harness` / `infembed`) on a small real model: a softmax
regression on scikit-learn's 8x8 digit images, given as a model file, a checkpoint and
data files exactly as a user would."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import InfluenceEmbedder, slice_opponents
from harness.cli import build_parser, main
from harness.report import read_slice_table

from conftest import train_lbfgs

MODEL_SOURCE = """
from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""
EMBED_OPTIONS = ["--layers", "1", "--arnoldi-dim", "16", "--embedding-dim", "8", "--seed", "3", "--batch-size", "2000"]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> dict[str, Path]:
    """A model file, its checkpoint, a .pt train split and an .npz test split of digit images."""
    folder = tmp_path_factory.mktemp("user")
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    x = torch.as_tensor(images[order] / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    y = torch.as_tensor(labels[order])
    (folder / "digits_model.py").write_text(MODEL_SOURCE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    train_lbfgs(model, x[:1200], y[:1200], weight_decay=1e-3, steps=30)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save((x[:1200], y[:1200]), folder / "train.pt")
    np.savez(folder / "test.npz", inputs=x[1200:].numpy(), targets=y[1200:].numpy())
    return {
        "folder": folder,
        "model": folder / "digits_model.py",
        "checkpoint": folder / "model.pt",
        "train": folder / "train.pt",
        "test": folder / "test.npz",
        "trained": model,
    }


@pytest.fixture(scope="module")
def embeddings(user_files) -> Path:
    out = user_files["folder"] / "emb.npz"
    code = main([
        "embed", "--model-module", f"{user_files['model']}:build", "--checkpoint", str(user_files["checkpoint"]),
        "--train", str(user_files["train"]), "--test", str(user_files["test"]), *EMBED_OPTIONS,
        "--out", str(out), "--quiet",
    ])
    assert code == 0
    return out


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_embed_writes_what_the_library_computes(user_files, embeddings):
    with np.load(embeddings) as archive:
        data = {k: archive[k] for k in archive.files}
    meta = json.loads(str(data["meta"]))
    assert meta["format"] == "harness.embeddings/1" and meta["layers"] == ["1"]
    assert meta["factor_config"]["arnoldi_dim"] == 16 and meta["factor_config"]["seed"] == 3

    x_train, y_train = torch.load(user_files["train"])
    test = np.load(user_files["test"])
    model = user_files["trained"]
    embedder = InfluenceEmbedder(model, layers="1", arnoldi_dim=16, embedding_dim=8, seed=3, progress=False)
    embedder.fit(DataLoader(TensorDataset(x_train, y_train), batch_size=2000))
    test_loader = DataLoader(TensorDataset(torch.as_tensor(test["inputs"]), torch.as_tensor(test["targets"])),
                             batch_size=2000)
    np.testing.assert_allclose(data["test_embeddings"], embedder.transform(test_loader), rtol=1e-5, atol=1e-6)
    assert data["train_embeddings"].shape == (1200, embedder.n_components_)
    np.testing.assert_array_equal(data["test_labels"], test["targets"])
    with torch.no_grad():
        expected = model(torch.as_tensor(test["inputs"])).argmax(1).numpy()
    np.testing.assert_array_equal(data["test_predictions"], expected)


@pytest.mark.parametrize("projection", ["gradients", "forward"])
def test_embed_projection_option_gives_the_same_embeddings(user_files, embeddings, tmp_path, projection):
    """--projection forces one exact path: the embeddings equal the automatic path's (here the
    closed form for a last linear layer) to float32 round-off, and the file names the path used."""
    out = tmp_path / f"{projection}.npz"
    code = main([
        "embed", "--model-module", f"{user_files['model']}:build", "--checkpoint", str(user_files["checkpoint"]),
        "--train", str(user_files["train"]), "--test", str(user_files["test"]), *EMBED_OPTIONS,
        "--projection", projection, "--chunk-size", "64", "--out", str(out), "--quiet",
    ])
    assert code == 0
    with np.load(out) as forced, np.load(embeddings) as automatic:
        assert json.loads(str(forced["meta"]))["projection"] == projection
        assert json.loads(str(automatic["meta"]))["projection"] == "closed_form"
        for split in ("train", "test"):
            expected = automatic[f"{split}_embeddings"]
            np.testing.assert_allclose(forced[f"{split}_embeddings"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_embed_refuses_a_chunk_size_below_one(user_files, tmp_path, capsys):
    code, _, stderr = _run([
        "embed", "--model-module", f"{user_files['model']}:build", "--train", str(user_files["train"]),
        "--test", str(user_files["test"]), "--chunk-size", "0", "--out", str(tmp_path / "x.npz"),
    ], capsys)
    assert code == 2 and "--chunk-size" in stderr and not (tmp_path / "x.npz").exists()


def test_kmeans_slices_opponents_and_report_end_to_end(user_files, embeddings, tmp_path, capsys):
    out = tmp_path / "mine"
    code, stdout, _ = _run([
        "slices", "--embeddings", str(embeddings), "--k", "5", "--opponents", "3", "--n-nearest", "2",
        "--test-data", str(user_files["test"]), "--train-data", str(user_files["train"]),
        "--class-names", ",".join(f"digit {i}" for i in range(10)), "--out", str(out), "--quiet",
    ], capsys)
    assert code == 0, stdout
    table = read_slice_table(out / "slices.csv")
    assert len(table) == 5 and table["size"].astype(int).sum() == 597
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["k"] == 5 and summary["config"]["embedding"]["layers"] == ["1"]
    data = np.load(embeddings)
    first = table.iloc[0]
    expected, _ = slice_opponents(data["train_embeddings"], data["test_embeddings"][first["members"]], k=3)
    assert first["opponents"] == expected.tolist()
    assert all(label.startswith("digit ") for label in first["opponent_labels"])
    for column in ("nearest_thumbnails", "opponent_thumbnails"):
        assert all((out / path).is_file() for paths in table[column] for path in paths)

    code, stdout, _ = _run(["opponents", "--embeddings", str(embeddings), "--slices", str(out),
                            "--slice", str(first["slice"]), "--k", "3", "--out", str(tmp_path / "opp.csv")], capsys)
    assert code == 0
    listed = np.loadtxt(tmp_path / "opp.csv", delimiter=",", skiprows=1, usecols=1, dtype=np.int64)
    assert listed.tolist() == expected.tolist()

    code, stdout, _ = _run(["report", str(out), "--quiet"], capsys)
    assert code == 0
    assert (out / "report.html").read_text().count('class="slice-card"') == 5


def test_rule_slices_meet_the_rule(embeddings, tmp_path, capsys):
    code, stdout, stderr = _run(["slices", "--embeddings", str(embeddings), "--rule", "--max-accuracy", "0.85",
                                 "--min-size", "10", "--branching", "2", "--max-depth", "3", "--opponents", "0",
                                 "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 0, stderr
    table = read_slice_table(tmp_path / "slices.csv")
    assert len(table) >= 1
    assert (table["accuracy"].astype(float) <= 0.85).all() and (table["size"].astype(int) >= 10).all()
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["method"] == "InfEmbed-Rule"


def _bad_files(folder: Path) -> dict[str, Path]:
    torch.save((torch.zeros(5, 8, 8), torch.zeros(4, dtype=torch.long)), folder / "short.pt")
    torch.save((torch.zeros(5, 8, 8), torch.zeros(5)), folder / "float_targets.pt")
    torch.save(nn.Linear(3, 2).state_dict(), folder / "other.pt")
    np.savez(folder / "no_labels.npz", test_embeddings=np.zeros((3, 2)))
    (folder / "empty").mkdir(exist_ok=True)
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "--model-module", "{model}", "--train", "{train}", "--test", "{test}", "--out", "x.npz"],
         "must be MODULE:ATTRIBUTE"),
        (["embed", "--model-module", "{model}:nope", "--train", "{train}", "--test", "{test}", "--out", "x.npz"],
         "has no attribute 'nope'"),
        (["embed", "--model-module", "no_such_module_xyz:build", "--train", "{train}", "--test", "{test}",
          "--out", "x.npz"], "cannot import model module"),
        (["embed", "--model-module", "{model}:build", "--checkpoint", "{folder}/missing.pt", "--train", "{train}",
          "--test", "{test}", "--out", "x.npz"], "checkpoint not found"),
        (["embed", "--model-module", "{model}:build", "--checkpoint", "{bad}/other.pt", "--train", "{train}",
          "--test", "{test}", "--out", "x.npz"], "does not fit the model"),
        (["embed", "--model-module", "{model}:build", "--train", "{bad}/short.pt", "--test", "{test}",
          "--out", "x.npz"], "mismatched lengths: 5 inputs but 4 targets"),
        (["embed", "--model-module", "{model}:build", "--train", "{bad}/float_targets.pt", "--test", "{test}",
          "--out", "x.npz"], "integer class indices"),
        (["embed", "--model-module", "{model}:build", "--train", "{train}", "--test", "{test}", "--layers", "fc",
          "--out", "x.npz"], "unknown layer name 'fc'"),
        (["slices", "--embeddings", "{emb}", "--k", "3", "--max-accuracy", "0.3", "--out", "{bad}/o"],
         "only apply with --rule"),
        (["slices", "--embeddings", "{emb}", "--k", "100000", "--out", "{bad}/o"], "n_slices"),
        (["slices", "--embeddings", "{bad}/no_labels.npz", "--k", "2", "--out", "{bad}/o"], "lacks array"),
        (["slices", "--embeddings", "{emb}", "--rule", "--max-accuracy", "0.0", "--min-size", "1000",
          "--out", "{bad}/o"], "found no slice"),
        (["opponents", "--embeddings", "{emb}", "--slices", "{bad}/empty", "--slice", "0"], "no slice table"),
        (["report", "{bad}/empty"], "no slice-report directory"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(user_files, embeddings, tmp_path, capsys, args, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    _bad_files(bad)
    values = {"model": user_files["model"], "train": user_files["train"], "test": user_files["test"],
              "folder": user_files["folder"], "emb": embeddings, "bad": bad}
    code, _, stderr = _run([a.format(**values) for a in args], capsys)
    assert code == 2
    assert stderr.startswith(f"infembed {args[0]}: error: ") and message in stderr, stderr


def test_unknown_slice_is_named(embeddings, tmp_path, capsys):
    assert _run(["slices", "--embeddings", str(embeddings), "--k", "2", "--opponents", "0", "--out", str(tmp_path),
                 "--quiet"], capsys)[0] == 0
    code, _, stderr = _run(["opponents", "--embeddings", str(embeddings), "--slices", str(tmp_path),
                            "--slice", "7"], capsys)
    assert code == 2 and "no slice '7'" in stderr


def test_k_and_rule_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slices", "--embeddings", "e.npz", "--k", "3", "--rule", "--out", "o"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_explains_every_option(capsys):
    parsers = list(_parsers(build_parser()))
    assert [p.prog for p in parsers[1:]] == [f"infembed {c}" for c in ("embed", "slices", "opponents", "report")]
    for parser in parsers:
        for action in parser._actions:
            assert action.help and len(action.help) > 10, f"{parser.prog} {action.option_strings} has no help"
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in parser._actions:
            assert all(option in text for option in action.option_strings)


def test_python_dash_m_harness_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["harness", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("harness", run_name="__main__")
    assert exit_info.value.code == 0
    assert "embed" in capsys.readouterr().out


def test_embed_under_torchrun_matches_one_process(user_files, embeddings, tmp_path):
    """`torchrun --nproc-per-node 2 -m harness embed` (gloo on loopback) writes what one process writes."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    out = tmp_path / "emb2.npz"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "harness", "embed",
         "--model-module", f"{user_files['model']}:build", "--checkpoint", str(user_files["checkpoint"]),
         "--train", str(user_files["train"]), "--test", str(user_files["test"]), *EMBED_OPTIONS,
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as two, np.load(embeddings) as one:
        assert json.loads(str(two["meta"]))["world_size"] == 2
        np.testing.assert_allclose(two["eigenvalues"], one["eigenvalues"], rtol=1e-5)
        for split in ("train", "test"):
            a, b = two[f"{split}_embeddings"], one[f"{split}_embeddings"]
            np.testing.assert_allclose(a @ a[:50].T, b @ b[:50].T, rtol=1e-3, atol=1e-4 * np.abs(b @ b[:50].T).max())
            np.testing.assert_array_equal(two[f"{split}_predictions"], one[f"{split}_predictions"])
