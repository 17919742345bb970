"""Command line: influence embeddings, slices, opponents and HTML reports for your own model.

    python -m harness embed --model-module mypkg.models:build --checkpoint model.pt \\
        --train train.pt --test test.pt --layers fc --out emb.npz
    python -m harness slices --embeddings emb.npz --k 25 --out results/mine
    python -m harness slices --embeddings emb.npz --rule --max-accuracy 0.4 --min-size 25 --out results/mine
    python -m harness opponents --embeddings emb.npz --slices results/mine --slice 3 --k 10
    python -m harness report results/

(``infembed`` is the same program installed as a console script.) Every bad input
exits with status 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from harness.embed import InfluenceEmbedder
from harness.errors import InputError
from harness import distributed
from harness.io import atomic_savez, atomic_write_text
from harness.report.html import (
    experiment_dirs,
    read_slice_table,
    save_slice_table,
    save_thumbnails,
    write_report,
    write_reports,
)
from harness.slicing import kmeans_slices, rule_slices, slice_opponents, slice_proponents, summarize_slices
from harness.train import predict

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
        raise InputError(f"{what} not found: {path}")
    return path


def load_model(spec: str, checkpoint: str | None = None):
    """The model named by ``MODULE:ATTRIBUTE`` (a dotted module or a .py file), with weights
    from ``checkpoint`` (a state dict, or a dict holding one under 'state_dict' /
    'model_state_dict'). ATTRIBUTE is an ``nn.Module`` or a callable returning one."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise InputError(f"--model-module must be MODULE:ATTRIBUTE (e.g. mypkg.models:build); got {spec!r}")
    if module_name.endswith(".py"):
        source = _existing_file(module_name, "model file")
        module_spec = importlib.util.spec_from_file_location(source.stem, source)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        # Console scripts do not put the working directory on sys.path; `python -m` does.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise InputError(f"cannot import model module {module_name!r}: {exc}") from exc
    if not hasattr(module, attribute):
        raise InputError(f"model module {module_name!r} has no attribute {attribute!r}")
    target = getattr(module, attribute)
    model = target if isinstance(target, nn.Module) else (target() if callable(target) else None)
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} must be an nn.Module or a callable returning one; got {type(model).__name__}")
    if checkpoint is not None:
        path = _existing_file(checkpoint, "checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for unreadable files
            raise InputError(f"{path} is not a readable state-dict checkpoint: {exc}") from exc
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model_state_dict", state))
        if not isinstance(state, dict):
            raise InputError(f"{path} holds {type(state).__name__}, not a state dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise InputError(f"checkpoint {path} does not fit the model built by {spec}: {exc}") from exc
    return model.eval()


def load_examples(path: str | os.PathLike) -> dict[str, Any]:
    """``{"inputs": Tensor, "targets": LongTensor, "texts": list[str] | None}`` from a data file."""
    path = _existing_file(path, "data file")
    texts = None
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (ValueError, OSError) as exc:
            raise InputError(f"{path} is not a readable .npz of numeric/string arrays: {exc}") from exc
        missing = [k for k in ("inputs", "targets") if k not in arrays]
        if missing:
            raise InputError(f"{path} lacks array(s) {missing}; it has {sorted(arrays)}")
        inputs, targets = torch.as_tensor(arrays["inputs"]), torch.as_tensor(arrays["targets"])
        if "texts" in arrays:
            texts = [str(t) for t in arrays["texts"]]
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for unreadable files
            raise InputError(f"{path} is not a readable torch file of (inputs, targets): {exc}") from exc
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
    path = _existing_file(path, "embeddings file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {k: archive[k] for k in archive.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable .npz embeddings file: {exc}") from exc
    required = [*REQUIRED_EMBEDDING_KEYS, *(["train_embeddings"] if need_train else [])]
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"{path} lacks array(s) {missing}; it has {sorted(data)}")
    data["meta"] = json.loads(str(data["meta"])) if "meta" in data else {}
    return data


def _class_names(value: str | None) -> list[str] | None:
    """A file with one name per line, or a comma-separated list."""
    if value is None:
        return None
    path = Path(value)
    names = path.read_text().splitlines() if path.is_file() else value.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError(f"--class-names {value!r} holds no names")
    return names


# ---------------------------------------------------------------- embed
def cmd_embed(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1; got {args.batch_size}")
    # Under torchrun each rank factors and embeds its own contiguous shard (see harness.distributed).
    sharded = distributed.init_from_env()
    model = load_model(args.model_module, args.checkpoint).to(args.device)
    dtype = next(model.parameters()).dtype
    splits, shards = {}, {}
    for split, path in (("train", args.train), ("test", args.test)):
        data = load_examples(path)
        inputs = data["inputs"].to(dtype) if data["inputs"].dtype.is_floating_point else data["inputs"]
        dataset = TensorDataset(inputs, data["targets"])
        splits[split] = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
        shards[split] = DataLoader(distributed.shard(dataset), batch_size=args.batch_size) if sharded else splits[split]
    embedder = InfluenceEmbedder(
        model,
        layers=args.layers,
        arnoldi_dim=args.arnoldi_dim,
        embedding_dim=args.embedding_dim,
        seed=args.seed,
        hessian_reduction=args.hessian_reduction,
        damping=args.damping,
        device=args.device,
        progress=not args.quiet,
    )
    embedder.fit(shards["train"])
    arrays: dict[str, Any] = {"eigenvalues": embedder.eigenvalues_.numpy()}
    for split, loader in splits.items():
        arrays[f"{split}_embeddings"] = embedder.transform(shards[split])
        predictions = predict(model, loader, device=args.device, progress=not args.quiet)
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
        "n_parameters": embedder.selection.numel,
        "test_accuracy": float((arrays["test_labels"] == arrays["test_predictions"]).mean()),
    }
    out = Path(args.out)
    if distributed.rank() != 0:  # every rank holds the same result; one writes it
        return 0
    meta["world_size"] = distributed.world_size()
    atomic_savez(out, meta=np.array(json.dumps(meta)), **arrays)
    if args.factors:
        embedder.save(args.factors)
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
    rule_options = {"max_accuracy": 0.4, "min_size": 25, "branching": 3, "max_depth": 10}
    if args.k is not None:
        given = [f"--{k.replace('_', '-')}" for k in rule_options if getattr(args, k) is not None]
        if given:
            raise InputError(f"{', '.join(given)} only apply with --rule, not with --k")
    for key, default in rule_options.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.n_nearest < 1 or args.opponents < 0:
        raise InputError("--n-nearest must be >= 1 and --opponents >= 0")
    emb = load_embeddings(args.embeddings, need_train=args.opponents > 0)
    test = emb["test_embeddings"]
    labels, predictions = emb["test_labels"], emb["test_predictions"]
    if args.k is not None:
        slices, _ = kmeans_slices(test, args.k, seed=args.seed)
        method = {"method": "InfEmbed (K-Means)", "k": args.k}
    else:
        slices, _ = rule_slices(
            test, labels == predictions, args.max_accuracy, args.min_size, args.branching, args.max_depth, args.seed
        )
        method = {"method": "InfEmbed-Rule", **{k: getattr(args, k) for k in rule_options}}
        if not slices:
            raise InputError(
                f"InfEmbed-Rule found no slice with accuracy <= {args.max_accuracy} and size >= {args.min_size}; "
                "relax --max-accuracy or --min-size"
            )
    names = _class_names(args.class_names)
    if names is not None:
        span = int(max(labels.max(), predictions.max()))
        if span >= len(names):
            raise InputError(f"--class-names has {len(names)} names but labels/predictions reach class {span}")
    frame = summarize_slices(slices, test, labels, predictions, n_nearest=args.n_nearest, class_names=names)
    if args.opponents:
        train = emb["train_embeddings"]
        opponents = [
            slice_opponents(train, test[members], k=args.opponents)
            for members in tqdm(frame["members"], desc="slice opponents", disable=args.quiet, leave=False)
        ]
        frame["opponents"] = [ids.tolist() for ids, _ in opponents]
        frame["opponent_scores"] = [[round(float(s), 6) for s in scores] for _, scores in opponents]
        if "train_labels" in emb:
            frame["opponent_labels"] = [
                [names[emb["train_labels"][i]] if names else int(emb["train_labels"][i]) for i in ids]
                for ids, _ in opponents
            ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test_data = load_examples(args.test_data) if args.test_data else None
    if test_data is not None and test_data["inputs"].shape[0] != test.shape[0]:
        raise InputError(f"--test-data has {test_data['inputs'].shape[0]} examples but {test.shape[0]} test embeddings")
    _thumbnail_or_text_columns(frame, "nearest", "nearest", test_data, out, "test")
    if args.opponents:
        train_data = load_examples(args.train_data) if args.train_data else None
        if train_data is not None and train_data["inputs"].shape[0] != emb["train_embeddings"].shape[0]:
            raise InputError(f"--train-data has {train_data['inputs'].shape[0]} examples but "
                             f"{emb['train_embeddings'].shape[0]} train embeddings")
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
    shown = frame[["slice", "size", "accuracy", "n_errors", "top_label", "top_prediction"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wrote {out / 'slices.csv'} and {out / 'summary.json'}; render with: {PROG} report {out}")
    return 0


# ---------------------------------------------------------------- opponents
def cmd_opponents(args: argparse.Namespace) -> int:
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
    members = np.asarray(match.iloc[0]["members"], dtype=np.int64)
    test = emb["test_embeddings"]
    if members.size == 0 or members.max() >= test.shape[0]:
        raise InputError(
            f"slice {args.slice} members do not index the {test.shape[0]} test embeddings of {args.embeddings}"
        )
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
    if args.out is not None:
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
    embed.add_argument("--arnoldi-dim", type=int, default=500, metavar="P",
                       help="Arnoldi iterations, i.e. Hessian-vector-product passes over --train (paper: 500) "
                       "(default: %(default)s)")
    embed.add_argument("--embedding-dim", type=int, default=100, metavar="D",
                       help="eigenpairs kept = embedding width (paper: 100); at most P (default: %(default)s)")
    embed.add_argument("--seed", type=int, default=0, help="seed of the Arnoldi start vector (default: %(default)s)")
    embed.add_argument("--hessian-reduction", choices=("mean", "sum"), default="mean",
                       help="Hessian of the mean training loss, or of the sum (Captum's convention) "
                       "(default: %(default)s)")
    embed.add_argument("--damping", type=float, default=0.0,
                       help="added to every kept eigenvalue (default: %(default)s)")
    embed.add_argument("--batch-size", type=int, default=128, help="examples per batch (default: %(default)s)")
    embed.add_argument("--device", default="cpu",
                       help="torch device for gradients, HVPs and predictions, e.g. cpu or cuda (default: %(default)s)")
    embed.add_argument("--factors", metavar="FILE",
                       help="also save the fitted factors (InfluenceEmbedder.save) to embed more data later")
    embed.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the embeddings")
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
    slices.add_argument("--max-accuracy", type=float, metavar="A",
                        help="with --rule: keep regions with accuracy <= A (default 0.4)")
    slices.add_argument("--min-size", type=int, metavar="S", help="with --rule: and at least S examples (default 25)")
    slices.add_argument("--branching", type=int, metavar="B", help="with --rule: clusters per split (default 3)")
    slices.add_argument("--max-depth", type=int, help="with --rule: deepest split (default 10)")
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
        "from disk in any browser. The directory contract is documented in harness/report/html.py.",
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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except InputError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
