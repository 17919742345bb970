"""The case-study pipeline, its cache and the options built from configuration dataclasses."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
from dataclasses import dataclass, fields, replace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits
from torch import nn

from harness import FactorConfig, InfluenceEmbedder
from harness.cache import Cache, content_key, stage_key
from harness.data.splits import per_class_subset
from harness.errors import InputError
from harness.models import TrunkHead
from harness.options import add_config_options, config_from_args, option
from harness.paths import has_dataset
from harness.train import TrainConfig
from experiments.pipeline import Part, Source, Study, Training, embed, feature_loader


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- cache
def test_a_stage_runs_once_and_its_key_follows_inputs_and_configuration(fresh_cache):
    cache, calls = Cache("unit"), []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3)}

    first = cache.stage("numbers", compute, inputs={"data": "a"}, config={"n": 3})
    again = cache.stage("numbers", compute, inputs={"data": "a"}, config={"n": 3})
    assert len(calls) == 1 and again.key == first.key and torch.equal(again.value["x"], first.value["x"])
    arguments = json.loads((fresh_cache / "unit" / "numbers" / f"{first.key}.json").read_text())
    assert arguments["inputs"] == {"data": "a"} and arguments["config"] == {"n": 3}
    # A later stage keyed from this one's result changes when any upstream input changes.
    other_data = cache.stage("numbers", compute, inputs={"data": "b"}, config={"n": 3})
    other_config = cache.stage("numbers", compute, inputs={"data": "a"}, config={"n": 4})
    assert len({first.key, other_data.key, other_config.key}) == 3 and len(calls) == 3
    assert stage_key("next", {"numbers": first}) != stage_key("next", {"numbers": other_data})
    assert stage_key("numbers", {"data": "a"}, {"n": 3}, version="2") != first.key


def test_content_key_sees_values_dtype_and_order():
    a = np.arange(4)
    assert content_key(a) == content_key(np.arange(4))
    assert content_key(a) != content_key(a[::-1].copy())
    assert content_key(a) != content_key(a.astype(np.int32))
    assert content_key(a, "x") != content_key(a, "y")


# ---------------------------------------------------------------- options
@dataclass
class Example:
    size: int = option(3, "how many")
    limit: int | None = option(None, "at most this many")
    rate: float = option(0.5, "a rate")
    mode: str = option("fast", "how", choices=("fast", "slow"))
    verbose: bool = option(False, "say more")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_options(parser, Example, presets={"paper scale": {"size": 9}})
    return parser, parser.parse_args(argv)


def test_options_come_from_the_fields_with_help_defaults_and_choices():
    parser, args = _parse([])
    text = parser.format_help()
    assert "how many (default: 3; paper scale: 9)" in text and "--no-verbose" in text
    assert config_from_args(Example(), args) == Example()
    assert config_from_args(Example(), args, {"size": 9}).size == 9
    _, args = _parse(["--size", "4", "--limit", "none", "--mode", "slow", "--verbose", "--rate", "1e-3"])
    assert config_from_args(Example(), args, {"size": 9, "limit": 7}) == Example(4, None, 1e-3, "slow", True)
    with pytest.raises(SystemExit):
        _parse(["--mode", "medium"])
    with pytest.raises(InputError, match="does not have"):
        config_from_args(Example(), args, {"sizes": 1})


def test_cli_embed_offers_every_factor_config_field():
    from harness.cli import build_parser

    embed = build_parser()._subparsers._group_actions[0].choices["embed"]
    flags = {option for action in embed._actions for option in action.option_strings}
    assert {f"--{f.name.replace('_', '-')}" for f in fields(FactorConfig)} <= flags


def test_per_class_subset_is_balanced_sorted_and_seeded():
    labels = np.repeat(np.arange(3), [5, 2, 8])
    picked = per_class_subset(labels, 3, seed=1)
    assert np.bincount(labels[picked]).tolist() == [3, 2, 3]
    assert np.all(np.diff(picked) > 0) and np.array_equal(picked, per_class_subset(labels, 3, seed=1))
    assert np.array_equal(per_class_subset(labels, None), np.arange(15))
    with pytest.raises(InputError, match="per_class"):
        per_class_subset(labels, 0)


# ---------------------------------------------------------------- pipeline
def _digits_study(factors: FactorConfig) -> Study:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:300] / 16, dtype=torch.float32), torch.tensor(y[:300])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    split = TrunkHead(model=model, trunk=model[0], head=nn.Sequential(model[1], model[2]), head_layers=("1",))
    data = {"train": (x[:200], y[:200]), "test": (x[200:], y[200:])}
    return Study(
        name="digits", model=split, class_names=[str(c) for c in range(10)],
        sources={n: Source(feature_loader(a, b, 50), content_key(a, b)) for n, (a, b) in data.items()},
        fit=Part("train", np.arange(0, 200, 2)), analysed=Part("test"), pool=Part("train"),
        training=Training(TrainConfig(epochs=3, lr=1e-2, seed=0), loader=feature_loader(*data["train"], 32, True),
                          data_key=content_key(*data["train"])),
        factors=factors, batch_size=50,
    )


def test_pipeline_embeddings_equal_a_hand_wired_embedder_and_reruns_load_them(fresh_cache):
    factors = FactorConfig(arnoldi_dim=24, embedding_dim=5, seed=0)
    result = embed(_digits_study(factors), progress=False)

    # By hand, on the weights the pipeline trained: head features of the fit rows, then the analysed rows.
    study = _digits_study(factors)
    study.model.model.load_state_dict(result.study.model.model.state_dict())
    with torch.no_grad():
        x_train, y_train = next(iter(feature_loader(*study.sources["train"].loader.dataset.tensors, 200)))
        x_test, y_test = study.sources["test"].loader.dataset.tensors
        f_train, f_test = study.model.trunk(x_train), study.model.trunk(x_test)
    by_hand = InfluenceEmbedder(study.model.head, layers=["1"], arnoldi_dim=24, embedding_dim=5, seed=0,
                                progress=False).fit(feature_loader(f_train[::2], y_train[::2], 50))
    np.testing.assert_allclose(result.embeddings, by_hand.transform(feature_loader(f_test, y_test, 50)),
                               rtol=1e-4, atol=1e-6)
    assert result.fit_size == 100 and result.pool_embeddings.shape == (200, result.embeddings.shape[1])
    assert np.array_equal(result.labels, y_test.numpy())

    again = embed(_digits_study(factors), progress=False)
    assert again.keys == result.keys and np.array_equal(again.embeddings, result.embeddings)
    changed = embed(_digits_study(replace(factors, embedding_dim=4)), progress=False)
    assert changed.keys["weights"] == result.keys["weights"] and changed.keys["factors"] != result.keys["factors"]
    assert changed.embeddings.shape[1] == 4

    ids, frame = result.kmeans(3, seed=0)
    assert frame["size"].sum() == len(ids) == 100
    opponents = result.opponents(frame, k=4)
    assert len(opponents) == 3 and all(len(found) == 4 and max(found) < 200 for found, _ in opponents)
    coverage = result.coverage(frame)
    assert coverage["slice_examples"] == 100 and coverage["errors_covered"] == coverage["n_errors"]


# ---------------------------------------------------------------- torchrun
COVID_TINY = ["--subset", "40", "--epochs", "1", "--image-size", "32", "--blocks", "1,1,1,16", "--arnoldi-dim", "8",
              "--embedding-dim", "4", "--quiet"]


def _covid_rank(rank: int, world: int, port: int, out: str, cache: str) -> None:
    os.environ["INFEMBED_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.set_num_threads(1)
        from experiments import covid_xray

        covid_xray.main([*COVID_TINY, "--out", out])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not has_dataset("covid-chestxray"), reason="shared dataset 'covid-chestxray' is absent")
def test_two_gloo_processes_write_what_one_process_writes(tmp_path, fresh_cache):
    pytest.importorskip("torchxrayvision")
    from experiments import covid_xray

    covid_xray.main([*COVID_TINY, "--out", str(tmp_path / "single")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Same cache: the ranks load the trained model and trunk features, then fit and embed their shards.
    mp.start_processes(_covid_rank, args=(2, port, str(tmp_path / "sharded"), str(fresh_cache)), nprocs=2,
                       join=True, start_method="spawn")
    single, sharded = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("single", "sharded"))
    for summary in (single, sharded):
        summary.pop("runtime_s"), summary.pop("environment")
    assert sharded == single
    for name in ("clusters.csv", "table4.csv", "slices.csv"):
        assert (tmp_path / "sharded" / name).read_text() == (tmp_path / "single" / name).read_text()
    factors = sorted((fresh_cache / "covid_xray" / "factors").glob("*.json"))
    assert sorted(json.loads(f.read_text())["config"]["world_size"] for f in factors) == [1, 2]
