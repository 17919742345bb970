"""Command line: influence embeddings, slices, opponents and HTML reports for your own model.

    python -m harness embed --model-module mypkg.models:build --checkpoint model.pt \\
        --train train.pt --test test.pt --layers fc --out emb.npz
    python -m harness slices --embeddings emb.npz --k 25 --out results/mine
    python -m harness slices --embeddings emb.npz --rule --max-accuracy 0.4 --min-size 25 --out results/mine
    python -m harness opponents --embeddings emb.npz --slices results/mine --slice 3 --k 10
    python -m harness report results/

(``infembed`` is the same program installed as a console script.) Every bad input
exits with status 2 and one line naming the problem, checked before the long work
starts; Ctrl-C exits with 130 and one line; an internal error exits with 1 and one line
(``INFEMBED_DEBUG=1`` shows the traceback instead). Outputs are written atomically, so a
failure or an interrupt leaves nothing half-written, and ``embed`` caches the fitted
factors (keyed by model, weights, training data and options), so a rerun resumes after
the fit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import traceback
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from harness import distributed
from harness.cache import content_key, stage_key, weights_key
from harness.embed import FACTORS_FORMAT, PROJECTIONS, FactorConfig, InfluenceEmbedder
from harness.errors import InputError, exit_status
from harness.io import (
    atomic_path,
    atomic_savez,
    atomic_write_text,
    check_output_dir,
    check_output_path,
    load_torch_file,
    output_dir,
)
from harness.options import add_config_options, config_from_args, flag
from harness.paths import cache_dir
from harness.report import (
    experiment_dirs,
    read_slice_table,
    save_slice_table,
    save_thumbnails,
    write_report,
    write_reports,
)
from harness.slicing import (
    RuleConfig,
    kmeans_slices,
    opponents_per_slice,
    rule_slices,
    slice_opponents,
    slice_proponents,
    summarize_slices,
)
from harness.task import ClassificationTask
from harness.train import predict
from harness.validation import check_device, check_float, check_indices, check_int, check_numeric_array, check_seed

PROG = "infembed"
EMBEDDINGS_FORMAT = "harness.embeddings/1"
REQUIRED_EMBEDDING_KEYS = ("test_embeddings", "test_labels", "test_predictions")

DATA_HELP = """\
Data files hold (inputs, targets) of a split, in loader order:
  .pt/.pth  torch.save((inputs, targets)) or torch.save({"inputs": ..., "targets": ...})
  .npz      numpy.savez(path, inputs=..., targets=...), optionally texts=... (one string per example)
inputs is (N, ...) and is fed to the model in batches; targets are integer class indices (N,).
Floating inputs are cast to the dtype of the model's parameters."""

EMBEDDINGS_HELP = f"""\
The embeddings file (.npz, format {EMBEDDINGS_FORMAT}) holds train_embeddings (N, D), test_embeddings
(M, D), train_labels, train_predictions, test_labels, test_predictions, eigenvalues and meta (a JSON string:
the configuration and data files). A file written by your own code needs at least {', '.join(REQUIRED_EMBEDDING_KEYS)}
(and train_embeddings for opponents)."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped descriptions and epilogs."""


# ---------------------------------------------------------------- loading user inputs
def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} is not a regular file" if path.exists() else f"{what} not found: {path}")
    return path


def _where(exc: BaseException, source: str | None = None) -> str:
    """``file:line`` of the innermost frame of ``exc`` (in ``source`` when given)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() != Path(__file__).resolve()]
    if source is not None:
        frames = [f for f in frames if Path(f.filename).resolve() == Path(source).resolve()] or frames
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _user_code_error(what: str, exc: Exception, source: str | None = None) -> InputError:
    if isinstance(exc, SyntaxError):
        return InputError(f"{what}: syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}")
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return InputError(f"{what} raised {type(exc).__name__}{': ' + reason if reason else ''}{_where(exc, source)}")


def _import_model_module(module_name: str):
    if module_name.endswith(".py"):
        source = _existing_file(module_name, "model file")
        module_spec = importlib.util.spec_from_file_location(source.stem, source)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's code: any failure is theirs to fix, named in one line
            raise _user_code_error(f"loading model file {source}", exc, str(source)) from exc
        return module
    # Console scripts do not put the working directory on sys.path; `python -m` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise InputError(f"cannot import model module {module_name!r}: {exc}") from exc
    except Exception as exc:  # the user's code
        raise _user_code_error(f"importing model module {module_name!r}", exc) from exc


def load_model(spec: str, checkpoint: str | None = None):
    """The model named by ``MODULE:ATTRIBUTE`` (a dotted module or a .py file), with weights
    from ``checkpoint`` (a state dict, or a dict holding one under 'state_dict' /
    'model_state_dict'). ATTRIBUTE is an ``nn.Module`` or a callable returning one.

    Raises ``InputError`` for: a spec without ``:``; a missing file or module; a syntax
    error or exception in the module or the builder (naming file and line); an attribute
    that is neither a module nor a callable returning one; a checkpoint that is missing,
    not a torch file, holds pickled objects, is not a state dict or does not fit.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise InputError(f"--model-module must be MODULE:ATTRIBUTE (e.g. mypkg.models:build); got {spec!r}")
    module = _import_model_module(module_name)
    if not hasattr(module, attribute):
        raise InputError(f"model module {module_name!r} has no attribute {attribute!r}")
    target = getattr(module, attribute)
    if isinstance(target, nn.Module):
        model = target
    elif callable(target):
        try:
            model = target()
        except Exception as exc:  # the user's builder
            raise _user_code_error(f"the model builder {spec}()", exc) from exc
        if not isinstance(model, nn.Module):
            raise InputError(f"the model builder {spec}() returned {type(model).__name__}, not an nn.Module")
    else:
        raise InputError(
            f"{spec} is {type(target).__name__} {_short_repr(target)}, not an nn.Module or a callable returning one"
        )
    if checkpoint is not None:
        path = _existing_file(checkpoint, "checkpoint")
        state = load_torch_file(path, "state-dict checkpoint")
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model_state_dict", state))
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise InputError(f"{path} holds {type(state).__name__}, not a state dict (parameter name -> tensor)")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(f"checkpoint {path} does not fit the model built by {spec}: {exc}") from exc
    if next(model.parameters(), None) is None:
        raise InputError(f"the model built by {spec} has no parameters")
    return model.eval()


def _short_repr(value: Any) -> str:
    text = repr(value)
    return f"({text[:40]}...)" if len(text) > 40 else f"({text})"


def load_examples(path: str | os.PathLike) -> dict[str, Any]:
    """``{"inputs": Tensor, "targets": LongTensor, "texts": list[str] | None}`` from a data file.

    Raises ``InputError`` for: a missing file; an .npz that is not readable without pickle
    or lacks ``inputs``/``targets``; a torch file that is not readable with
    ``weights_only=True`` (a file naming Python objects runs nothing and is refused) or
    does not hold ``(inputs, targets)``; non-numeric arrays; inputs without a non-empty
    example dimension; targets that are not 1-D integer class indices; lengths of
    inputs, targets and texts that differ; texts that are not 1-D.
    """
    path = _existing_file(path, "data file")
    texts = None
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path} is not a readable .npz of numeric/string arrays: {exc}") from exc
        missing = [k for k in ("inputs", "targets") if k not in arrays]
        if missing:
            raise InputError(f"{path} lacks array(s) {missing}; it has {sorted(arrays)}")
        try:
            inputs, targets = torch.as_tensor(arrays["inputs"]), torch.as_tensor(arrays["targets"])
        except (TypeError, RuntimeError) as exc:
            raise InputError(f"{path}: inputs and targets must be numeric arrays: {exc}") from exc
        if "texts" in arrays:
            if arrays["texts"].ndim != 1:
                raise InputError(f"{path}: texts must be a 1-D array of strings; got shape {arrays['texts'].shape}")
            texts = [str(t) for t in arrays["texts"]]
    else:
        data = load_torch_file(path, "torch file of (inputs, targets)")
        if isinstance(data, dict) and {"inputs", "targets"} <= data.keys():
            inputs, targets = data["inputs"], data["targets"]
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            inputs, targets = data
        else:
            raise InputError(f"{path} must hold (inputs, targets) or {{'inputs': ..., 'targets': ...}}")
    if not torch.is_tensor(inputs) or not torch.is_tensor(targets):
        raise InputError(f"{path}: inputs and targets must be tensors/arrays")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise InputError(f"{path}: inputs must have a non-empty example dimension; got shape {tuple(inputs.shape)}")
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise InputError(f"{path}: targets must be a 1-D array of integer class indices; got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if targets.shape[0] != inputs.shape[0]:
        raise InputError(f"{path}: mismatched lengths: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
    if texts is not None and len(texts) != inputs.shape[0]:
        raise InputError(f"{path}: mismatched lengths: {inputs.shape[0]} inputs but {len(texts)} texts")
    return {"inputs": inputs, "targets": targets.long(), "texts": texts}


def load_embeddings(path: str | os.PathLike, need_train: bool = False) -> dict[str, Any]:
    """The arrays of an embeddings file, each checked: embeddings 2-D and finite, labels and
    predictions 1-D integers of matching length, ``meta`` a JSON object. ``InputError`` otherwise."""
    path = _existing_file(path, "embeddings file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} is not a readable .npz embeddings file: {exc}") from exc
    required = [*REQUIRED_EMBEDDING_KEYS, *(["train_embeddings"] if need_train else [])]
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"{path} lacks array(s) {missing}; it has {sorted(data)}")
    for split in ("train", "test"):
        if f"{split}_embeddings" not in data:
            continue
        embeddings = check_numeric_array(data[f"{split}_embeddings"], f"{path}: {split}_embeddings")
        if embeddings.ndim != 2 or embeddings.shape[0] == 0 or not np.isfinite(embeddings).all():
            raise InputError(f"{path}: {split}_embeddings must be a non-empty finite 2-D array; got {embeddings.shape}")
        for kind in ("labels", "predictions"):
            key = f"{split}_{kind}"
            if key in data:
                values = data[key]
                if values.shape != (embeddings.shape[0],) or not np.issubdtype(values.dtype, np.integer):
                    raise InputError(f"{path}: {key} must be {embeddings.shape[0]} integer class indices; "
                                     f"got {values.dtype} {values.shape}")
    if need_train and data["train_embeddings"].shape[1] != data["test_embeddings"].shape[1]:
        raise InputError(f"{path}: train and test embeddings differ in width")
    meta = {}
    if "meta" in data:
        try:
            meta = json.loads(str(data["meta"]))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{path}: 'meta' is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise InputError(f"{path}: 'meta' must be a JSON object; got {type(meta).__name__}")
    data["meta"] = meta
    return data


def _class_names(value: str | None) -> list[str] | None:
    """A file with one name per line, or a comma-separated list."""
    if value is None:
        return None
    path = Path(value)
    try:
        names = path.read_text().splitlines() if path.is_file() else value.split(",")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--class-names file {path} is not readable text: {exc}") from exc
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError(f"--class-names {value!r} holds no names")
    return names


# ---------------------------------------------------------------- embed
def _factors_cache_path(model: nn.Module, train: dict[str, Any], embedder: InfluenceEmbedder) -> Path:
    """Where the factors of this exact fit are cached: keyed by the model (architecture and
    every weight), the training data, the factor configuration and the kernel environment
    (:mod:`harness.cache`), so a rerun after an interrupt (or with other test data) skips
    FactorHessian."""
    key = stage_key("factors", inputs={"model": weights_key(model), "train": content_key(train["inputs"], train["targets"])},
                    config={"config": asdict(embedder.config), "layers": embedder.layers, "device": str(embedder.device)},
                    version=FACTORS_FORMAT)
    return cache_dir("cli", "factors") / f"{key}.pt"


def _check_runs_on(model: nn.Module, data: dict[str, Any], device: torch.device, split: str, batch_size: int) -> None:
    """The model runs on the split's first batch (right width and dtype, targets in range):
    a mismatch fails here, in the first second, not after the fit."""
    inputs, targets = data["inputs"][:batch_size].to(device), data["targets"][:batch_size].to(device)
    try:
        ClassificationTask().validate(model, (inputs, targets))
    except InputError as exc:
        raise InputError(f"--{split} {exc}") from exc
    with torch.no_grad():
        n_classes = model(inputs[:1]).shape[-1]
    low, high = int(data["targets"].min()), int(data["targets"].max())
    if low < 0 or high >= n_classes:
        raise InputError(f"--{split}: targets span [{low}, {high}] but the model has {n_classes} classes")


def cmd_embed(args: argparse.Namespace) -> int:
    batch_size = check_int(args.batch_size, "--batch-size", 1)
    factor_config = config_from_args(FactorConfig(), args)
    check_int(factor_config.arnoldi_dim, "--arnoldi-dim", 1)
    check_int(factor_config.embedding_dim, "--embedding-dim", 1)
    check_seed(factor_config.seed, "--seed")
    check_float(factor_config.damping, "--damping", 0.0)
    if args.chunk_size is not None:
        check_int(args.chunk_size, "--chunk-size", 1)
    device = check_device(args.device, "--device")
    out = check_output_path(args.out, "--out")
    factors_path = check_output_path(args.factors, "--factors") if args.factors else None
    if factors_path is not None and factors_path.absolute() == out.absolute():
        raise InputError("--factors and --out name the same file")
    # Under torchrun each rank factors and embeds its own contiguous shard (see harness.distributed).
    sharded = distributed.init_from_env()
    model = load_model(args.model_module, args.checkpoint).to(device)
    transform_options = {"projection": args.projection, "chunk_size": args.chunk_size}
    embedder = InfluenceEmbedder(model, layers=args.layers, device=device, progress=not args.quiet,
                                 **transform_options, **asdict(factor_config))
    dtype = next(model.parameters()).dtype
    examples, splits, shards = {}, {}, {}
    for split, path in (("train", args.train), ("test", args.test)):
        data = examples[split] = load_examples(path)
        if data["inputs"].dtype.is_floating_point:
            data["inputs"] = data["inputs"].to(dtype)
        _check_runs_on(model, data, device, split, batch_size)
        dataset = TensorDataset(data["inputs"], data["targets"])
        splits[split] = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        shards[split] = DataLoader(distributed.shard(dataset), batch_size=batch_size) if sharded else splits[split]
    cached = None if (sharded or args.no_cache) else _factors_cache_path(model, examples["train"], embedder)
    if cached is not None and cached.is_file():
        embedder = InfluenceEmbedder.load(cached, model, device=device, progress=not args.quiet, **transform_options)
        print(f"reusing the factors fitted earlier on the same model and data ({cached})", file=sys.stderr)
    else:
        embedder.fit(shards["train"])
        if cached is not None:
            embedder.save(cached)
    arrays: dict[str, Any] = {"eigenvalues": embedder.eigenvalues_.numpy()}
    for split, loader in splits.items():
        arrays[f"{split}_embeddings"] = embedder.transform(shards[split])
        predictions = predict(model, loader, device=device, progress=not args.quiet)
        arrays[f"{split}_labels"] = predictions.targets
        arrays[f"{split}_predictions"] = predictions.predicted
    meta = {
        "format": EMBEDDINGS_FORMAT,
        "model_module": args.model_module,
        "checkpoint": args.checkpoint,
        "train": args.train,
        "test": args.test,
        "layers": args.layers,
        "factor_config": asdict(embedder.config),
        "n_components": embedder.n_components_,
        "projection": embedder.projection_mode_,
        "n_parameters": embedder.selection.numel,
        "test_accuracy": float((arrays["test_labels"] == arrays["test_predictions"]).mean()),
    }
    if distributed.rank() != 0:  # every rank holds the same result; one writes it
        return 0
    meta["world_size"] = distributed.world_size()
    # Both files or neither: the factors go to a temporary name first and are renamed only
    # once the embeddings are written too.
    with contextlib.ExitStack() as stack:
        if factors_path is not None:
            embedder.save(stack.enter_context(atomic_path(factors_path)))
        atomic_savez(out, meta=np.array(json.dumps(meta)), **arrays)
    print(
        f"wrote {out}: train {arrays['train_embeddings'].shape}, test {arrays['test_embeddings'].shape}, "
        f"{embedder.n_components_} components over {embedder.selection.numel} parameters; "
        f"test accuracy {meta['test_accuracy']:.4f}"
    )
    return 0


# ---------------------------------------------------------------- slices
def _thumbnail_or_text_columns(frame, column: str, prefix: str, data: dict | None, out: Path, kind: str) -> None:
    """Adds ``<prefix>_thumbnails`` (image inputs) or ``<prefix>_texts`` (texts) for the indices in ``column``."""
    if data is None:
        return
    if data["texts"] is not None:
        frame[f"{prefix}_texts"] = frame[column].map(lambda ids: [data["texts"][i] for i in ids])
        return
    inputs = data["inputs"]
    is_image = inputs.dim() == 3 or (inputs.dim() == 4 and (inputs.shape[1] in (1, 3) or inputs.shape[-1] in (1, 3)))
    if not is_image:
        print(f"note: {kind} inputs of shape {tuple(inputs.shape)} are not images; no thumbnails", file=sys.stderr)
        return
    wanted = sorted({int(i) for ids in frame[column] for i in ids})
    paths = dict(zip(wanted, save_thumbnails(inputs[wanted].numpy(), out, [f"{kind}_{i}" for i in wanted])))
    frame[f"{prefix}_thumbnails"] = frame[column].map(lambda ids: [paths[int(i)] for i in ids])


def cmd_slices(args: argparse.Namespace) -> int:
    if args.k is not None:
        given = [flag(f.name) for f in fields(RuleConfig) if hasattr(args, f.name)]
        if given:
            raise InputError(f"{', '.join(given)} only apply with --rule, not with --k")
    rule = config_from_args(RuleConfig(), args)
    check_int(args.n_nearest, "--n-nearest", 1)
    check_int(args.opponents, "--opponents", 0)
    check_seed(args.seed, "--seed")
    if args.k is not None:
        check_int(args.k, "--k", 1)
    else:
        check_float(rule.max_accuracy, "--max-accuracy", 0.0, 1.0)
        check_int(rule.min_size, "--min-size", 1)
        check_int(rule.branching, "--branching", 2)
        check_int(rule.max_depth, "--max-depth", 0)
    out = check_output_dir(args.out, "--out")
    emb = load_embeddings(args.embeddings, need_train=args.opponents > 0)
    test = emb["test_embeddings"]
    labels, predictions = emb["test_labels"], emb["test_predictions"]
    if args.k is not None:
        slices, _ = kmeans_slices(test, args.k, seed=args.seed)
        method = {"method": "InfEmbed (K-Means)", "k": args.k}
    else:
        slices, _ = rule_slices(
            test, labels == predictions, rule.max_accuracy, rule.min_size, rule.branching, rule.max_depth, args.seed
        )
        method = {"method": "InfEmbed-Rule", **asdict(rule)}
        if not slices:
            raise InputError(
                f"InfEmbed-Rule found no slice with accuracy <= {rule.max_accuracy} and size >= {rule.min_size}; "
                "relax --max-accuracy or --min-size"
            )
    names = _class_names(args.class_names)
    if names is not None:
        named = [labels, predictions, *([emb["train_labels"]] if args.opponents and "train_labels" in emb else [])]
        low, span = int(min(v.min() for v in named)), int(max(v.max() for v in named))
        if low < 0 or span >= len(names):
            raise InputError(f"--class-names has {len(names)} names but labels/predictions span classes [{low}, {span}]")
    frame = summarize_slices(slices, test, labels, predictions, n_nearest=args.n_nearest, class_names=names)
    if args.opponents:
        opponents = opponents_per_slice(emb["train_embeddings"], test, frame["members"], args.opponents,
                                        progress=not args.quiet)
        frame["opponents"] = [ids for ids, _ in opponents]
        frame["opponent_scores"] = [scores for _, scores in opponents]
        if "train_labels" in emb:
            frame["opponent_labels"] = [
                [names[emb["train_labels"][i]] if names else int(emb["train_labels"][i]) for i in ids]
                for ids, _ in opponents
            ]
    test_data = load_examples(args.test_data) if args.test_data else None
    if test_data is not None and test_data["inputs"].shape[0] != test.shape[0]:
        raise InputError(f"--test-data has {test_data['inputs'].shape[0]} examples but {test.shape[0]} test embeddings")
    train_data = load_examples(args.train_data) if args.train_data and args.opponents else None
    if train_data is not None and train_data["inputs"].shape[0] != emb["train_embeddings"].shape[0]:
        raise InputError(f"--train-data has {train_data['inputs'].shape[0]} examples but "
                         f"{emb['train_embeddings'].shape[0]} train embeddings")
    with output_dir(out, "--out"):  # a failure from here on leaves no new folder behind
        _write_slice_report(args, out, frame, emb, method, test_data, train_data)
    shown = frame[["slice", "size", "accuracy", "n_errors", "top_label", "top_prediction"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out / 'slices.csv'} and {out / 'summary.json'}; render with: {PROG} report {out}")
    return 0


def _write_slice_report(args, out: Path, frame, emb: dict, method: dict, test_data, train_data) -> None:
    test, labels, predictions = emb["test_embeddings"], emb["test_labels"], emb["test_predictions"]
    _thumbnail_or_text_columns(frame, "nearest", "nearest", test_data, out, "test")
    if args.opponents:
        _thumbnail_or_text_columns(frame, "opponents", "opponent", train_data, out, "train")
    save_slice_table(frame, out / "slices.csv")
    meta = emb["meta"]
    summary = {
        "title": args.title or f"{method['method']} slices of {Path(args.embeddings).name}",
        "config": {**method, "seed": args.seed, "n_nearest": args.n_nearest, "opponents": args.opponents,
                   "embeddings": args.embeddings, "embedding": meta},
        "data_source": {
            "kind": "user data",
            "description": args.data_source or f"train {meta.get('train', '?')}, test {meta.get('test', '?')}",
        },
        "metrics": {
            "test examples": int(test.shape[0]),
            "test accuracy": round(float((labels == predictions).mean()), 4),
            "slices": int(len(frame)),
        },
    }
    atomic_write_text(json.dumps(summary, indent=2), out / "summary.json")


# ---------------------------------------------------------------- opponents
def cmd_opponents(args: argparse.Namespace) -> int:
    check_int(args.k, "--k", 1)
    if args.out is not None:
        check_output_path(args.out, "--out")
    emb = load_embeddings(args.embeddings, need_train=True)
    table_path = Path(args.slices)
    if table_path.is_dir():
        table_path = table_path / "slices.csv"
    table = read_slice_table(table_path)
    if "members" not in table.columns:
        raise InputError(f"{table_path} has no 'members' column: write it with `{PROG} slices`")
    match = table[table["slice"].astype(str) == str(args.slice)]
    if match.empty:
        raise InputError(f"no slice {args.slice!r} in {table_path}; slices: {table['slice'].tolist()}")
    test = emb["test_embeddings"]
    members = check_indices(match.iloc[0]["members"], f"{table_path}: slice {args.slice} members", test.shape[0])
    if members.size == 0:
        raise InputError(f"{table_path}: slice {args.slice} has no members")
    find = slice_proponents if args.proponents else slice_opponents
    indices, scores = find(emb["train_embeddings"], test[members], k=args.k)
    result = pd.DataFrame({"rank": np.arange(1, len(indices) + 1), "train_index": indices, "influence": scores})
    for key in ("train_labels", "train_predictions"):
        if key in emb:
            result[key.removeprefix("train_")[:-1]] = emb[key][indices]
    kind = "proponents" if args.proponents else "opponents"
    print(f"top {len(indices)} {kind} of slice {args.slice} ({members.size} examples):")
    print(result.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if args.out:
        atomic_write_text(result.to_csv(index=False), args.out)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    if not Path(args.results_dir).is_dir():
        raise InputError(f"RESULTS_DIR {args.results_dir} is not a directory")
    if args.out is not None:
        check_output_path(args.out, "--out")
        directories = experiment_dirs(args.results_dir)
        if len(directories) != 1:
            raise InputError(
                f"--out needs a single slice-report directory; {args.results_dir} holds {len(directories)}"
            )
        paths = [write_report(directories[0], args.out)]
    else:
        paths = write_reports(args.results_dir, progress=not args.quiet)
    for path in paths:
        print(f"wrote {path}")
    print(f"open {paths[-1]} in a browser (no server needed)")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="InfEmbed: find the slices of a test set where your model errs, by clustering influence "
        "embeddings, explain them by their opponents, and browse them as HTML.",
        epilog="Run `%(prog)s COMMAND --help` for the options of each command.",
        formatter_class=_Formatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="the command to run; each has its own --help"
    )

    embed = commands.add_parser(
        "embed",
        help="influence embeddings of a train and a test split for your model",
        description="Fits the Hessian factors (FactorHessian: Arnoldi on the training loss) and writes the "
        "influence embeddings and predictions of both splits to an .npz file. Under torchrun "
        "(`torchrun --standalone --nproc-per-node N -m harness embed ...`, or `make embed-distributed NPROC=N`) "
        "every rank factors and embeds its shard, HVPs are summed with all_reduce, and rank 0 writes the file.",
        epilog=DATA_HELP + "\n\n" + EMBEDDINGS_HELP,
        formatter_class=_Formatter,
    )
    embed.add_argument("--model-module", required=True, metavar="MODULE:ATTR",
                       help="the model: MODULE:ATTR where MODULE is a dotted module importable from the working "
                       "directory or a path to a .py file, and ATTR an nn.Module or a function returning one "
                       "(called without arguments)")
    embed.add_argument("--checkpoint", metavar="FILE",
                       help="state dict to load into the model (torch.save(model.state_dict()), or a dict holding it "
                       "under 'state_dict'/'model_state_dict'); omit if ATTR returns a trained model")
    embed.add_argument("--train", required=True, metavar="FILE",
                       help="training split (.pt or .npz, see below): the Hessian is fitted on it and its embeddings "
                       "are the candidates for slice opponents")
    embed.add_argument("--test", required=True, metavar="FILE", help="test/validation split whose slices you want")
    embed.add_argument("--layers", nargs="+", metavar="NAME",
                       help="modules or parameter names defining theta (e.g. fc layer4); default: every trainable "
                       "parameter")
    add_config_options(embed.add_argument_group("factor options (harness.FactorConfig; the fit data is --train)"),
                       FactorConfig, metavars={"arnoldi_dim": "P", "embedding_dim": "D"})
    transform = embed.add_argument_group("transform options (how the embeddings are computed; all exact, so the "
                                         "numbers agree to round-off)")
    transform.add_argument("--projection", default="auto", choices=PROJECTIONS,
                           help="per-example gradients times the factors by: 'gradients' (vmap), 'forward' "
                           "(forward-mode, one tangent per component), 'closed_form' (theta = a last nn.Linear "
                           "producing the logits), 'layerwise' (layer inputs x output gradients); 'auto' picks the "
                           "fastest that applies (default: %(default)s)")
    transform.add_argument("--chunk-size", type=int, metavar="N",
                           help="examples per vmap chunk of per-example gradients (bounds memory; default: the "
                           "whole batch)")
    embed.add_argument("--batch-size", type=int, default=128, help="examples per batch (default: %(default)s)")
    embed.add_argument("--device", default="cpu",
                       help="torch device for gradients, HVPs and predictions, e.g. cpu or cuda (default: %(default)s)")
    embed.add_argument("--factors", metavar="FILE",
                       help="also save the fitted factors (InfluenceEmbedder.save) to embed more data later")
    embed.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the embeddings")
    embed.add_argument("--no-cache", action="store_true",
                       help="neither reuse nor store the fitted factors in the cache (INFEMBED_CACHE); by default a "
                       "rerun on the same model, data and options skips the fit, e.g. after an interrupt")
    embed.add_argument("--quiet", action="store_true", help="no progress bars")
    embed.set_defaults(run=cmd_embed)

    slices = commands.add_parser(
        "slices",
        help="slices of the test split: K-Means (InfEmbed) or InfEmbed-Rule",
        description="Clusters the test embeddings into slices and writes a slice-report directory "
        "(slices.csv + summary.json, thumbnails/ with --test-data/--train-data images) for `report`.",
        epilog=EMBEDDINGS_HELP + "\n\n" + DATA_HELP,
        formatter_class=_Formatter,
    )
    slices.add_argument("--embeddings", required=True, metavar="FILE.npz", help="output of `embed`")
    method = slices.add_mutually_exclusive_group(required=True)
    method.add_argument("--k", type=int, metavar="K", help="InfEmbed: K-Means with K slices")
    method.add_argument("--rule", action="store_true",
                        help="InfEmbed-Rule: recursive K-Means until slices meet --max-accuracy and --min-size")
    add_config_options(slices.add_argument_group("InfEmbed-Rule options (only with --rule)"), RuleConfig,
                       metavars={"max_accuracy": "A", "min_size": "S", "branching": "B"})
    slices.add_argument("--seed", type=int, default=0, help="K-Means seed (default: %(default)s)")
    slices.add_argument("--n-nearest", type=int, default=4,
                        help="examples nearest each slice centre to list (default: %(default)s)")
    slices.add_argument("--opponents", type=int, default=4, metavar="K",
                        help="top opponents (most harmful training examples) listed per slice; 0: none "
                        "(default: %(default)s)")
    slices.add_argument("--class-names", metavar="FILE|A,B,...",
                        help="class names: a file with one per line, or a comma-separated list")
    slices.add_argument("--test-data", metavar="FILE",
                        help="the test split file given to `embed`: image inputs become thumbnails, texts are shown")
    slices.add_argument("--train-data", metavar="FILE", help="the train split file: thumbnails/texts of the opponents")
    slices.add_argument("--title", help="report title (default: method and embeddings file)")
    slices.add_argument("--data-source", metavar="TEXT",
                        help="describes the data in the report header (default: the data files given to `embed`)")
    slices.add_argument("--out", required=True, metavar="DIR", help="slice-report directory to write")
    slices.add_argument("--quiet", action="store_true", help="no progress bars")
    slices.set_defaults(run=cmd_slices)

    opponents = commands.add_parser(
        "opponents",
        help="the training examples most harmful (or helpful) to one slice",
        description="Ranks training examples by their influence on the slice's total loss, "
        "mu(z')^T sum_i mu(z_i) (paper, C.6); opponents are the most negative.",
        epilog=EMBEDDINGS_HELP,
        formatter_class=_Formatter,
    )
    opponents.add_argument("--embeddings", required=True, metavar="FILE.npz", help="output of `embed`")
    opponents.add_argument("--slices", required=True, metavar="DIR|CSV",
                           help="slice-report directory or slices.csv written by `slices`")
    opponents.add_argument("--slice", required=True, metavar="ID", help="the slice id (column 'slice')")
    opponents.add_argument("--k", type=int, default=10,
                           help="how many training examples to list (default: %(default)s)")
    opponents.add_argument("--proponents", action="store_true", help="list the most helpful examples instead")
    opponents.add_argument("--out", metavar="FILE.csv", help="also write the list as CSV")
    opponents.set_defaults(run=cmd_opponents)

    report = commands.add_parser(
        "report",
        help="self-contained HTML slice reports from a results directory",
        description="Writes report.html into every slice-report directory (slices*.csv + summary.json) under "
        "RESULTS_DIR and an index.html linking them. Reports embed their CSS, JavaScript and images: open them "
        "from disk in any browser. The directory contract is documented in harness/report/contract.py.",
        formatter_class=_Formatter,
    )
    report.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="a slice-report directory, or a folder of them (e.g. results/)")
    report.add_argument("--out", metavar="FILE.html",
                        help="write the report here instead (only when RESULTS_DIR is a single slice-report directory)")
    report.add_argument("--quiet", action="store_true", help="no progress bars")
    report.set_defaults(run=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command. Exit status: 0 done; 2 a bad input or an anticipated failure (one
    line ``infembed COMMAND: error: ...`` on stderr); 130 interrupted (Ctrl-C); 1 an
    internal error (one line; ``INFEMBED_DEBUG=1`` shows the traceback). Every file is
    written atomically, so a failure or an interrupt leaves nothing half-written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return exit_status(f"{PROG} {args.command}", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
