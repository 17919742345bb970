"""Bad inputs, hostile files and careless paths, on the API and on the command line.

Every case here was once a failure (issue 15: code run from a data file, a traceback
reaching the user, a special file clobbered); each must now end in an ``InputError``
naming the problem (one line and exit 2 on the command line), run nothing from a file,
and write nothing half-way. Add a case for every new bug found.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import InfluenceEmbedder, InputError, kmeans_slices, rule_slices, slice_opponents, summarize_slices
from harness.cli import main
from harness.io import atomic_savez, atomic_torch_save, atomic_write_text, check_output_path, remove_stale_temporaries

from conftest import train_lbfgs

REPO = Path(__file__).resolve().parent.parent
MODEL_SOURCE = """
from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def broken():
    raise ValueError("cannot build today")


not_a_module = 42
"""
EMBED_OPTIONS = ["--layers", "1", "--arnoldi-dim", "12", "--embedding-dim", "6", "--batch-size", "500", "--quiet"]


class Payload:
    """Unpickling this creates ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- fixtures: real digits, a trained softmax regression
@pytest.fixture(scope="module")
def digits():
    images, labels = load_digits(return_X_y=True)
    x = torch.as_tensor(images[:600] / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    y = torch.as_tensor(labels[:600])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    train_lbfgs(model, x[:400], y[:400], weight_decay=1e-3, steps=20)
    return model, x, y


@pytest.fixture(scope="module")
def fitted(digits, tmp_path_factory):
    model, x, y = digits
    embedder = InfluenceEmbedder(model, layers="1", arnoldi_dim=12, embedding_dim=6, progress=False)
    embedder.fit(DataLoader(TensorDataset(x[:400], y[:400]), batch_size=200))
    path = embedder.save(tmp_path_factory.mktemp("factors") / "factors.pt")
    return embedder, path


@pytest.fixture(scope="module")
def user_files(digits, tmp_path_factory):
    model, x, y = digits
    folder = tmp_path_factory.mktemp("user")
    (folder / "model.py").write_text(MODEL_SOURCE)
    torch.save(model.state_dict(), folder / "model.pt")
    torch.save((x[:400], y[:400]), folder / "train.pt")
    torch.save((x[400:], y[400:]), folder / "test.pt")
    torch.save((x[400:].reshape(-1, 4, 16)[:, :, :8], y[400:]), folder / "narrow.pt")
    return folder


def _embed_args(files: Path, out: Path, *extra: str, spec: str = "build") -> list[str]:
    return ["embed", "--model-module", f"{files / 'model.py'}:{spec}", "--checkpoint", str(files / "model.pt"),
            "--train", str(files / "train.pt"), "--test", str(files / "test.pt"), *EMBED_OPTIONS,
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def embeddings(user_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "emb.npz"
    assert main(_embed_args(user_files, out, "--no-cache")) == 0
    return out


def _fails(args: list[str], capsys, message: str, code: int = 2) -> str:
    """Runs the CLI; asserts exit ``code`` and one line on stderr containing ``message``."""
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- security: no code runs from a file
def test_factors_payload_runs_nothing_and_is_refused(digits, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "harness.influence-factors/1", "config": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="references the Python object") as info:
        InfluenceEmbedder.load(tmp_path / "evil.pt", digits[0])
    assert not marker.exists()
    assert "weights_only" not in str(info.value)  # torch's advice to run the file's code is not passed on


def test_cached_factors_payload_runs_nothing_on_the_command_line(user_files, tmp_path, capsys, monkeypatch):
    """The CLI's factor cache is read with the same safe loader."""
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "emb.npz"
    assert main(_embed_args(user_files, out)) == 0
    (cached,) = (tmp_path / "cache" / "cli" / "factors").glob("*.pt")
    marker = tmp_path / "pwned"
    torch.save({"payload": Payload(marker)}, cached)
    _fails(_embed_args(user_files, tmp_path / "again.npz"), capsys, "references the Python object")
    assert not marker.exists() and not (tmp_path / "again.npz").exists()


def test_checkpoint_payload_runs_nothing(user_files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "evil.pt")
    args = _embed_args(user_files, tmp_path / "emb.npz")
    args[args.index("--checkpoint") + 1] = str(tmp_path / "evil.pt")
    err = _fails(args, capsys, "references the Python object")
    assert not marker.exists() and "weights_only" not in err


def test_saved_factors_load_without_pickle(fitted):
    _, path = fitted
    state = torch.load(path, weights_only=True)  # raises if anything but tensors and containers is stored
    assert torch.is_tensor(state["ritz_residuals"]) and torch.is_tensor(state["arnoldi_spectrum"])


@pytest.fixture(scope="module")
def dcbench_module():
    from harness.compat import LegacyStackUnavailable, import_dcbench

    try:
        return import_dcbench()
    except LegacyStackUnavailable:
        pytest.skip("dcbench 0.0.4 not installed (see harness/compat.py)")


def test_dcbench_yaml_builds_no_python_object(dcbench_module, tmp_path):
    from harness.compat import load_dcbench_yaml

    marker = tmp_path / "pwned"
    for text in (f"- !!python/object/apply:builtins.open ['{marker}', 'w']",
                 "- !!python/name:os.system ''",
                 f"- !ArtifactContainer {{class: !!python/name:builtins.open '', container_id: x, attributes: {{}}, "
                 "artifacts: {}}"):
        with pytest.raises(InputError, match="not a dcbench problems file"):
            load_dcbench_yaml(text)
    assert not marker.exists()


def test_dcbench_model_payload_runs_nothing_without_opt_in(dcbench_module, tmp_path, monkeypatch):
    from harness.compat import TRUST_PICKLE_ENV, load_dcbench_model_file

    marker = tmp_path / "pwned"
    torch.save({"class": Payload(marker), "config": {}, "state_dict": {}}, tmp_path / "model.pt")
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(InputError, match=TRUST_PICKLE_ENV):
        load_dcbench_model_file(tmp_path / "model.pt")
    assert not marker.exists()


# ---------------------------------------------------------------- files: the atomic writer
def test_existing_mode_is_kept(tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write_text("new", target)
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_non_regular_targets_are_never_replaced(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "symlink":
        (tmp_path / "real.txt").write_text("keep")
        target.symlink_to(tmp_path / "real.txt")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    before = os.lstat(target)
    with pytest.raises(InputError, match="not a regular file: refusing to replace it"):
        atomic_write_text("x", target)
    after = os.lstat(target)
    assert (before.st_ino, before.st_mode) == (after.st_ino, after.st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_devices_and_bad_paths_are_refused_before_writing():
    for path, message in (("/dev/full", "is a device"), ("/dev/null", "is a device"), ("", "empty path"),
                          ("/proc/emb.npz", "not writable")):
        with pytest.raises(InputError, match=message):
            check_output_path(path)


def test_same_content_same_bytes(fitted, tmp_path):
    embedder, _ = fitted
    embedder.save(tmp_path / "a.pt")
    embedder.save(tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    arrays = {"x": np.arange(6.0).reshape(2, 3), "meta": np.array(json.dumps({"k": 1}))}
    atomic_savez(tmp_path / "a.npz", **arrays)
    time.sleep(1.1)  # zip timestamps have 2 s resolution; a timestamped writer could still collide
    atomic_savez(tmp_path / "b.npz", **arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as loaded:
        np.testing.assert_array_equal(loaded["x"], arrays["x"])


def test_a_killed_writers_temporary_is_removed_on_the_next_write(tmp_path):
    target = tmp_path / "big.pt"
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from harness.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(target), str(REPO)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".big.pt.")]
    assert len(stale) == 1 and not target.exists()
    atomic_torch_save({"x": torch.zeros(2)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["big.pt"]


def test_live_writers_and_other_files_are_not_cleaned(tmp_path):
    target = tmp_path / "t.txt"
    live = tmp_path / f".t.txt.{socket.gethostname()}-{os.getpid()}.abcd1234.tmp"
    other_host = tmp_path / ".t.txt.elsewhere-1.abcd1234.tmp"
    unrelated = tmp_path / ".t.txt.notes"
    for path in (live, other_host, unrelated):
        path.write_text("")
    assert remove_stale_temporaries(target) == []


# ---------------------------------------------------------------- API: InfluenceEmbedder arguments
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arnoldi_dim": True}, "arnoldi_dim must be an integer; got the boolean True"),
        ({"arnoldi_dim": 10.0}, "arnoldi_dim must be an integer"),
        ({"embedding_dim": "5"}, "embedding_dim must be an integer"),
        ({"damping": math.nan}, "damping must be finite"),
        ({"damping": math.inf}, "damping must be finite"),
        ({"damping": -1.0}, "damping must be >= 0.0"),
        ({"eigenvalue_rtol": math.nan}, "eigenvalue_rtol must be finite"),
        ({"eigenvalue_rtol": 1.0}, r"eigenvalue_rtol must be in \[0.0, 1.0\)"),
        ({"breakdown_tol": "small"}, "breakdown_tol must be a number"),
        ({"seed": "abc"}, "seed must be an integer; got str"),
        ({"seed": 1.7}, "seed must be an integer; got float"),
        ({"seed": -1}, r"seed must be in \[0, 4294967295\]"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"progress": "yes"}, "progress must be True or False"),
        ({"device": "banana"}, "'banana' is not a torch device"),
        ({"basis_device": 3}, "basis_device must be a device name"),
        ({"layers": [1]}, "layers must hold module or parameter names"),
        ({"task": "classification"}, "task must be a harness.Task"),
        ({"hessian_reduction": None}, "hessian_reduction must be one of"),
    ],
)
def test_bad_embedder_arguments(digits, kwargs, message):
    settings = {"layers": "1", "arnoldi_dim": 10, "embedding_dim": 4, **kwargs}
    with pytest.raises(InputError, match=message):
        InfluenceEmbedder(digits[0], **settings)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_named(digits):
    with pytest.raises(InputError, match="no CUDA GPU is available"):
        InfluenceEmbedder(digits[0], layers="1", device="cuda")


def test_data_the_model_cannot_run_on(digits):
    model, x, y = digits
    embedder = InfluenceEmbedder(model, layers="1", arnoldi_dim=5, embedding_dim=2, progress=False)
    for inputs, message in ((x.double(), "torch.float64 (50, 8, 8)"), (x[:, :4], "torch.float32 (50, 4, 8)")):
        with pytest.raises(InputError, match=re.escape(f"the model cannot run on the batch ({message}")):
            embedder.fit([(inputs[:50], y[:50])])


def test_shuffled_transform_loader_is_refused(fitted, digits):
    embedder, _ = fitted
    _, x, y = digits
    shuffled = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True)
    with pytest.raises(InputError, match="shuffles"):
        embedder.transform(shuffled)
    with pytest.raises(InputError, match="shuffles"):
        next(iter(embedder.gradients(shuffled)))


# ---------------------------------------------------------------- API: forged factors files
def _forge(path: Path, source: Path, **changes) -> Path:
    state = torch.load(source, weights_only=True)
    for key, value in changes.items():
        if value is KeyError:
            del state[key]
        elif key == "config_extra":
            state["config"] = {**state["config"], **value}
        else:
            state[key] = value
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"eigenvalues": KeyError}, r"lacks field\(s\) \['eigenvalues'\]"),
        ({"factors": torch.zeros(10, 6)}, r"factors have shape \(10, 6\); expected \(650, 6\)"),
        ({"factors": torch.zeros(650)}, "'factors' must be a 2-D floating tensor"),
        ({"eigenvalues": -torch.ones(6, dtype=torch.float64)}, "eigenvalues must be positive"),
        ({"eigenvalues": torch.full((6,), math.nan, dtype=torch.float64)}, "'eigenvalues' holds non-finite values"),
        ({"eigenvalues": [1.0] * 6}, "'eigenvalues' must be a tensor; got list"),
        ({"config_extra": {"curvature_magic": 1}}, r"unknown config key\(s\) \['curvature_magic'\]"),
        ({"config_extra": {"seed": "abc"}}, "seed must be an integer"),
        ({"config": "arnoldi"}, "'config' must be a dict"),
        ({"parameter_shapes": [[10, "64"], [10]]}, "'parameter_shapes' must be one list of sizes"),
        ({"n_fit_examples": -3}, "'n_fit_examples' must be a positive integer"),
        ({"format": "harness.influence-factors/0"}, "is not an InfluenceEmbedder factors file"),
    ],
)
def test_forged_factors_files_are_refused(fitted, digits, tmp_path, changes, message):
    _, source = fitted
    path = _forge(tmp_path / "forged.pt", source, **changes)
    with pytest.raises(InputError, match=message):
        InfluenceEmbedder.load(path, digits[0])


def test_numpy_eigenvalues_are_refused_without_unpickling(fitted, digits, tmp_path):
    _, source = fitted
    path = _forge(tmp_path / "forged.pt", source, eigenvalues=np.ones(6))
    with pytest.raises(InputError, match="references the Python object numpy"):
        InfluenceEmbedder.load(path, digits[0])


def test_load_refuses_options_that_belong_to_the_file(fitted, digits):
    _, path = fitted
    with pytest.raises(InputError, match="come from the factors file"):
        InfluenceEmbedder.load(path, digits[0], seed=3)


# ---------------------------------------------------------------- API: slicing
@pytest.fixture(scope="module")
def slice_data(fitted, digits):
    embedder, _ = fitted
    model, x, y = digits
    embeddings = embedder.transform(DataLoader(TensorDataset(x[400:], y[400:]), batch_size=100))
    predictions = model(x[400:]).argmax(1).numpy()
    return embeddings, y[400:].numpy(), predictions


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e, y, p: kmeans_slices(e, True), "n_slices must be an integer; got the boolean True"),
        (lambda e, y, p: kmeans_slices(e, 3, seed="abc"), "seed must be an integer"),
        (lambda e, y, p: kmeans_slices(e.astype(str), 3), "embeddings must hold real numbers"),
        (lambda e, y, p: rule_slices(e, y == p, "0.5", 5), "max_accuracy must be a number; got str"),
        (lambda e, y, p: rule_slices(e, y == p, math.nan, 5), "max_accuracy must be finite"),
        (lambda e, y, p: rule_slices(e, y == p, 0.5, 5, branching=True), "branching must be an integer"),
        (lambda e, y, p: slice_opponents(e, e[:3], k=2.5), "k must be an integer"),
        (lambda e, y, p: summarize_slices(np.zeros(len(e), int), e, y, p, class_names=["a", "b"]),
         "class_names has 2 names but labels/predictions reach class 9"),
        (lambda e, y, p: summarize_slices(np.zeros(len(e), int), e, y, p, n_nearest=-1), "n_nearest must be >= 1"),
        (lambda e, y, p: summarize_slices([np.array([0.5, 1.7])], e, y, p), "must hold integer example indices"),
        (lambda e, y, p: summarize_slices([np.array([0, 1000])], e, y, p), "out of range"),
        (lambda e, y, p: summarize_slices([["0", "1"]], e, y, p), "must hold integer example indices"),
        (lambda e, y, p: summarize_slices(np.zeros(len(e)), e, y, p), "slice ids must be integers"),
    ],
)
def test_bad_slicing_arguments(slice_data, call, message):
    with pytest.raises(InputError, match=message):
        call(*slice_data)


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "spec, message",
    [
        ("broken", "the model builder "),
        ("not_a_module", "is int (42), not an nn.Module or a callable returning one"),
    ],
)
def test_model_builder_failures_are_one_line(user_files, tmp_path, capsys, spec, message):
    err = _fails(_embed_args(user_files, tmp_path / "emb.npz", spec=spec), capsys, message)
    if spec == "broken":
        assert "raised ValueError: cannot build today at" in err and "model.py:" in err


def test_model_file_with_a_syntax_error(user_files, tmp_path, capsys):
    (tmp_path / "model.py").write_text("def build(:\n    pass\n")
    args = _embed_args(user_files, tmp_path / "emb.npz")
    args[args.index("--model-module") + 1] = f"{tmp_path / 'model.py'}:build"
    _fails(args, capsys, "syntax error in")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "banana"], "--device 'banana' is not a torch device"),
        (["--damping", "nan"], "damping must be finite"),
        (["--seed", "-4"], "seed must be in"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_embed_options_fail_before_the_fit(user_files, tmp_path, capsys, monkeypatch, extra, message):
    def no_fit(*args, **kwargs):
        raise AssertionError("the fit started")

    monkeypatch.setattr(InfluenceEmbedder, "fit", no_fit)
    _fails(_embed_args(user_files, tmp_path / "emb.npz", "--no-cache", *extra), capsys, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu(user_files, tmp_path, capsys):
    _fails(_embed_args(user_files, tmp_path / "emb.npz", "--device", "cuda"), capsys, "no CUDA GPU is available")


def test_wrong_width_test_inputs_fail_before_the_fit(user_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(InfluenceEmbedder, "fit", lambda *a, **k: pytest.fail("the fit started"))
    args = _embed_args(user_files, tmp_path / "emb.npz", "--no-cache")
    args[args.index("--test") + 1] = str(user_files / "narrow.pt")
    _fails(args, capsys, "--test the model cannot run on the batch (torch.float32 (200, 4, 8))")


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda tmp: tmp, "is a directory, not a regular file"),
        (lambda tmp: "", "--out is an empty path"),
        (lambda tmp: Path("/proc/emb.npz"), "is not writable"),
        (lambda tmp: Path("/dev/full"), "is a device, not a regular file"),
    ],
)
def test_bad_out_paths_fail_before_the_fit(user_files, tmp_path, capsys, monkeypatch, make_out, message):
    monkeypatch.setattr(InfluenceEmbedder, "fit", lambda *a, **k: pytest.fail("the fit started"))
    _fails(_embed_args(user_files, make_out(tmp_path), "--no-cache"), capsys, message)


def test_bad_factors_path_fails_before_anything_is_written(user_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(InfluenceEmbedder, "fit", lambda *a, **k: pytest.fail("the fit started"))
    out = tmp_path / "emb.npz"
    _fails(_embed_args(user_files, out, "--factors", "/proc/factors.pt"), capsys, "--factors /proc/factors.pt")
    assert not out.exists()


def test_embed_writes_both_outputs_or_neither(user_files, tmp_path, capsys, monkeypatch):
    import harness.cli

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(harness.cli, "atomic_savez", disk_full)
    out, factors = tmp_path / "emb.npz", tmp_path / "factors.pt"
    _fails(_embed_args(user_files, out, "--no-cache", "--factors", str(factors)), capsys, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_is_one_line_and_a_rerun_reuses_the_fit(user_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out" / "emb.npz"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(InfluenceEmbedder, "transform", interrupted)
        _fails(_embed_args(user_files, out), capsys, "interrupted", code=130)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(InfluenceEmbedder, "fit", lambda *a, **k: pytest.fail("refitted instead of resuming"))
    assert main(_embed_args(user_files, out)) == 0
    assert "reusing the factors" in capsys.readouterr().err


def test_sigint_during_the_fit_exits_130_with_one_line(user_files, tmp_path):
    """A real Ctrl-C (SIGINT) in the middle of the Arnoldi passes, in a separate process."""
    args = _embed_args(user_files, tmp_path / "emb.npz", "--no-cache")
    args.remove("--quiet")
    args[args.index("--arnoldi-dim") + 1] = "650"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "INFEMBED_CACHE": str(tmp_path / "cache")}
    child = subprocess.Popen([sys.executable, "-m", "harness", *args], stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    seen = b""
    while b"Arnoldi" not in seen:
        chunk = child.stderr.read1(4096)
        assert chunk, f"ended before the fit: {seen!r}"
        seen += chunk
    child.send_signal(signal.SIGINT)
    rest = child.stderr.read().decode()
    assert child.wait(timeout=60) == 130, rest
    lines = [line for line in rest.replace("\r", "\n").splitlines() if line.strip() and "Arnoldi" not in line]
    assert lines == ["infembed embed: interrupted; nothing was half-written, and a rerun reuses what was cached"]
    assert list(tmp_path.glob("*emb.npz*")) == []


def test_bad_embeddings_files(embeddings, tmp_path, capsys):
    with np.load(embeddings, allow_pickle=False) as stored:
        arrays = dict(stored)
    cases = {
        "meta.npz": ({**arrays, "meta": np.array("{not json")}, "'meta' is not valid JSON"),
        "meta_list.npz": ({**arrays, "meta": np.array("[1, 2]")}, "'meta' must be a JSON object"),
        "labels.npz": ({**arrays, "test_labels": arrays["test_labels"][:5]}, "test_labels must be 200 integer"),
        "strings.npz": ({**arrays, "test_embeddings": arrays["test_embeddings"].astype(str)}, "must hold real numbers"),
    }
    for name, (content, message) in cases.items():
        np.savez(tmp_path / name, **content)
        _fails(["slices", "--embeddings", str(tmp_path / name), "--k", "3", "--out", str(tmp_path / "s")], capsys,
               message)
    assert not (tmp_path / "s").exists()


def test_slices_options_and_out(embeddings, tmp_path, capsys):
    base = ["slices", "--embeddings", str(embeddings), "--k", "3", "--quiet"]
    (tmp_path / "file").write_text("")
    _fails([*base, "--out", str(tmp_path / "file" / "s")], capsys, "exists and is not a directory")
    _fails([*base, "--out", ""], capsys, "--out is an empty path")
    _fails([*base, "--n-nearest", "-1", "--out", str(tmp_path / "s")], capsys, "--n-nearest must be >= 1")
    _fails([*base, "--class-names", "a,b", "--out", str(tmp_path / "s")], capsys, "--class-names has 2 names")
    assert not (tmp_path / "s").exists()


def test_a_failure_while_writing_the_report_leaves_no_folder(embeddings, user_files, tmp_path, capsys):
    x, y = torch.load(user_files / "test.pt", weights_only=True)
    x = x.clone()
    x[:, 0, 0] = math.nan  # thumbnails of non-finite images fail mid-write
    torch.save((x, y), tmp_path / "nan.pt")
    out = tmp_path / "new" / "report"
    _fails(["slices", "--embeddings", str(embeddings), "--k", "3", "--test-data", str(tmp_path / "nan.pt"),
            "--out", str(out), "--quiet"], capsys, "non-finite")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "cell, message",
    [
        ('"[0, 1, 2]"', "must be a list of example indices; got the string"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ("[[0, 1], [2, 3]]", "must be a flat list of example indices; got shape (2, 2)"),
        ("[0.5, 1]", "must hold integer example indices"),
        ("[true, false]", "must hold integer example indices"),
        ("[0, 100000]", "out of range"),
        ("abc", "neither JSON nor a Python literal"),
    ],
)
def test_bad_member_cells(embeddings, tmp_path, capsys, cell, message):
    import pandas as pd

    assert main(["slices", "--embeddings", str(embeddings), "--k", "3", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    capsys.readouterr()
    table = pd.read_csv(tmp_path / "s" / "slices.csv", dtype=str, keep_default_na=False)
    table.loc[0, "members"] = cell
    table.to_csv(tmp_path / "s" / "slices.csv", index=False)
    _fails(["opponents", "--embeddings", str(embeddings), "--slices", str(tmp_path / "s"), "--slice",
            table.loc[0, "slice"]], capsys, message)


def test_opponents_and_report_paths(embeddings, tmp_path, capsys):
    assert main(["slices", "--embeddings", str(embeddings), "--k", "3", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    capsys.readouterr()
    base = ["opponents", "--embeddings", str(embeddings), "--slices", str(tmp_path / "s"), "--slice", "0"]
    _fails([*base, "--out", str(tmp_path)], capsys, "is a directory")
    _fails([*base, "--k", "0"], capsys, "--k must be >= 1")
    _fails(["report", str(tmp_path / "missing")], capsys, "is not a directory")
    _fails(["report", str(tmp_path / "s"), "--out", "/dev/full"], capsys, "is a device")


def test_internal_errors_are_one_line_unless_debugging(user_files, tmp_path, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(InfluenceEmbedder, "fit", bug)
    args = _embed_args(user_files, tmp_path / "emb.npz", "--no-cache")
    _fails(args, capsys, "internal error: ZeroDivisionError: a bug of ours", code=1)
    monkeypatch.setenv("INFEMBED_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(args)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PK\x03\x04garbage", "is not a readable .npz"),  # was an internal BadZipFile
        (None, "is not a regular file"),  # a directory: was "not found"
    ],
)
def test_unreadable_data_files(user_files, tmp_path, capsys, content, message):
    path = tmp_path / "train.npz"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    args = _embed_args(user_files, tmp_path / "emb.npz", "--no-cache")
    args[args.index("--train") + 1] = str(path)
    _fails(args, capsys, message)


def test_torch_zip_errors_do_not_blame_torch(user_files, tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04garbage")
    args = _embed_args(user_files, tmp_path / "emb.npz")
    args[args.index("--checkpoint") + 1] = str(tmp_path / "ckpt.pt")
    err = _fails(args, capsys, "not a torch zip archive")
    assert "internal" not in err


def test_a_builder_needing_arguments_names_no_line_of_ours(user_files, tmp_path, capsys):
    args = _embed_args(user_files, tmp_path / "emb.npz")
    args[args.index("--model-module") + 1] = "torch.nn:Linear"
    err = _fails(args, capsys, "the model builder torch.nn:Linear() raised TypeError")
    assert "cli.py" not in err


@pytest.mark.parametrize(
    "loader, message",
    [
        (None, "must be an iterable of batches"),
        (5, "must be an iterable of batches"),
        ((batch for batch in []), "one-shot iterator (generator)"),  # was "empty loader" after the first pass
    ],
)
def test_fit_loaders_that_cannot_be_passed_over_repeatedly(digits, loader, message):
    embedder = InfluenceEmbedder(digits[0], layers="1", arnoldi_dim=5, embedding_dim=2, progress=False)
    with pytest.raises(InputError, match=re.escape(message)):
        embedder.fit(loader)


def test_paths_of_the_wrong_type(fitted, digits):
    embedder, _ = fitted
    with pytest.raises(InputError, match="factors file must be a path; got NoneType"):
        embedder.save(None)
    with pytest.raises(InputError, match="factors file must be a path; got NoneType"):
        InfluenceEmbedder.load(None, digits[0])


def test_a_slice_listing_an_example_twice(slice_data):
    embeddings, labels, predictions = slice_data
    with pytest.raises(InputError, match="more than once"):
        summarize_slices(np.zeros((len(embeddings), 2), int), embeddings, labels, predictions)


def test_dcbench_panels_are_read_without_unpickling(dcbench_module, tmp_path, monkeypatch):
    """meerkat's DataPanel.read unpickles state.dill and object .npy blocks; our reader does neither."""
    import pickle
    from types import SimpleNamespace

    import meerkat as mk

    from harness.compat import TRUST_PICKLE_ENV, load_dcbench_panel

    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    folder = tmp_path / "panel.mk"
    ids, act, probs = np.array(["a", "b", "c"]), np.arange(12.0).reshape(3, 4), torch.rand(3, 2)
    mk.DataPanel({"id": ids, "act": act, "probs": probs}).write(str(folder))
    marker = tmp_path / "pwned"
    for state in folder.rglob("state.dill"):
        state.write_bytes(pickle.dumps(Payload(marker)))
    panel = load_dcbench_panel(SimpleNamespace(local_path=folder))
    assert not marker.exists()
    np.testing.assert_array_equal(panel["id"].data, ids)
    np.testing.assert_array_equal(panel["act"].data, act)
    torch.testing.assert_close(panel["probs"].data, probs)
    (block,) = [p for p in folder.rglob("data.npy") if np.load(p).dtype.kind == "U"]
    np.save(block, np.array([Payload(marker)] * 3, dtype=object)[:, None], allow_pickle=True)
    with pytest.raises(InputError, match=f"cannot be read without unpickling.*{TRUST_PICKLE_ENV}=1"):
        load_dcbench_panel(SimpleNamespace(local_path=folder))
    assert not marker.exists()


def test_a_deeply_nested_summary_is_one_line(embeddings, tmp_path, capsys):
    assert main(["slices", "--embeddings", str(embeddings), "--k", "3", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    capsys.readouterr()
    (tmp_path / "s" / "summary.json").write_text("[" * 100_000)  # was a RecursionError traceback
    _fails(["report", str(tmp_path / "s"), "--quiet"], capsys, "summary.json is not valid JSON")


def test_imagenet_weights_payload_runs_nothing(tmp_path):
    from harness.models.vision import imagenet_resnet

    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "weights.pth")
    with pytest.raises(InputError, match="references the Python object") as info:
        imagenet_resnet("resnet18", tmp_path / "weights.pth")
    assert not marker.exists() and "weights_only" not in str(info.value)
