"""The RSNA bone-age loader on a small fixture in the public layout, and the spurious-signal
experiment end to end on it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.data.boneage import (
    AGE_GROUPS,
    GROUP_STARTS_MONTHS,
    MID_PUBERTY,
    age_group,
    load_boneage,
    read_boneage_table,
)
from harness.data.tiny_imagenet import TINY_IMAGENET
from harness.errors import InputError
from harness.paths import has_dataset


def write_rsna_layout(folder, rows, seed=0):
    """``folder/boneage.csv`` (id, boneage, male) and ``folder/images/<id>.png`` of varied sizes."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True)
    for image_id, _, _ in rows:
        height, width = rng.integers(40, 90, size=2)
        pixels = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
        Image.fromarray(pixels, mode="L").save(images / f"{image_id}.png")
    pd.DataFrame(rows, columns=["id", "boneage", "male"]).to_csv(folder / "boneage.csv", index=False)
    return folder / "boneage.csv", images


def test_age_groups_follow_sex_specific_stage_boundaries():
    months = np.array([10, 30, 30, 100, 100, 160, 170, 190, 200, 228])
    male = np.array([False, False, True, False, True, False, True, False, True, True])
    assert age_group(months, male).tolist() == [0, 1, 0, 2, 1, 3, 3, 4, 4, 4]
    assert AGE_GROUPS[MID_PUBERTY] == "early/mid-puberty"
    # Lower bounds belong to the older group.
    assert age_group(np.array([84, 108]), np.array([False, True])).tolist() == [2, 2]


def test_loader_reads_the_rsna_layout(tmp_path):
    rows = [(1377, 180.0, False), (1378, 12.0, True), (1379, 94.0, True), (1380, 120.0, False)]
    csv, images = write_rsna_layout(tmp_path, rows)
    x, y = load_boneage(csv, images, size=32, progress=False)
    assert x.shape == (4, 1, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == [4, 0, 1, 2]
    table = read_boneage_table(csv, images)
    assert table["path"].str.endswith(".png").all() and table["male"].tolist() == [False, True, True, False]


def test_missing_or_malformed_data_gives_a_clear_message(tmp_path):
    with pytest.raises(InputError, match="RSNA layout"):
        read_boneage_table(tmp_path / "absent.csv", tmp_path)
    csv, images = write_rsna_layout(tmp_path, [(1, 50.0, True), (2, 60.0, False)])
    (images / "2.png").unlink()
    with pytest.raises(InputError, match="missing from"):
        read_boneage_table(csv, images)
    pd.DataFrame({"id": [1], "age": [3]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match=r"lacks column\(s\) \['boneage', 'male'\]"):
        read_boneage_table(tmp_path / "bad.csv", images)
    pd.DataFrame({"id": [1], "boneage": [3], "male": ["maybe"]}).to_csv(tmp_path / "sex.csv", index=False)
    with pytest.raises(InputError, match="True/False"):
        read_boneage_table(tmp_path / "sex.csv", images)


def _ages_in_groups(groups, start):
    """Rows (id, bone age, male) with one age inside each requested group, sexes alternating."""
    rows = []
    for i, group in enumerate(groups):
        male = bool(i % 2)
        bounds = (0,) + GROUP_STARTS_MONTHS["male" if male else "female"] + (228,)
        rows.append((start + i, float((bounds[group] + bounds[group + 1]) // 2), male))
    return rows


def test_experiment_end_to_end_on_an_rsna_fixture(tmp_path, monkeypatch):
    """A fixture built to contain a slice: two thirds of the training images are pre-puberty, so a
    one-epoch model predicts pre-puberty; the test set has six images of every group, and the
    injected class's six test images (all wrong, one label, so one region of the label-driven
    influence embeddings) meet the rule whatever the noise in the pixels."""
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))  # train and embed afresh
    from experiments import boneage_spurious

    majority = AGE_GROUPS.index("pre-puberty")
    train_groups = [majority] * 40 + [g for g in range(5) if g != majority] * 5
    train_csv, train_images = write_rsna_layout(tmp_path / "train", _ages_in_groups(train_groups, 1000), seed=1)
    test_csv, test_images = write_rsna_layout(tmp_path / "test", _ages_in_groups(list(range(5)) * 6, 5000), seed=2)
    out = tmp_path / "out"
    summary = boneage_spurious.main([
        "--boneage-train-csv", str(train_csv), "--boneage-train-images", str(train_images),
        "--boneage-test-csv", str(test_csv), "--boneage-test-images", str(test_images),
        "--signals", "none,stripe", "--image-size", "32", "--epochs", "1", "--arnoldi-dim", "12",
        "--embedding-dim", "6", "--n-opponents", "10", "--seeds", "0", "--out", str(out), "--quiet",
    ])
    assert summary["data"]["source"] == "RSNA Pediatric Bone Age"
    assert summary["data"]["injected_class"] == "early/mid-puberty"
    assert summary["data"]["test_class_counts"].tolist() == [6] * 5
    assert [r["signal"] for r in summary["results"]] == ["none", "stripe"]
    slices = pd.read_csv(out / "slices.csv")
    for result in summary["results"]:
        assert result["min_size_used"] == round(25 * 30 / 200)
        assert result["test_accuracy"] == pytest.approx(0.2)  # pre-puberty everywhere: 6 of 30 right
        assert result["n_slices"] >= 1
        lowest = result["lowest_slice"]
        assert lowest["accuracy"] == 0.0 and lowest["prediction_distribution"] == {"pre-puberty": 1.0}
        assert lowest["accuracy"] <= result["max_accuracy_used"] and lowest["size"] >= result["min_size_used"]
        assert sum(lowest["label_distribution"].values()) == pytest.approx(1, abs=1e-3)
        assert 0.0 <= lowest["injected_class"]["share"] <= 1.0
        assert result["opponents"]["k"] == 10 and result["proponents"]["k"] == 10
        rows = slices[slices["group"] == f"{result['signal']} (seed 0)"]
        assert len(rows) == result["n_slices"]
        assert rows["accuracy"].min() == pytest.approx(lowest["accuracy"], abs=1e-4)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["results"] == json.loads(json.dumps(summary["results"]))
    for name in ("figure4_injections.png", "figure5.png", "per_seed.csv", "slices.csv"):
        assert (out / name).stat().st_size > 0
    findings = pd.read_csv(out / "per_seed.csv")
    assert findings["signal"].tolist() == ["none", "stripe"]
    assert (findings["data"] == "RSNA Pediatric Bone Age").all()
    assert (findings["n_slices"] >= 1).all() and findings["lowest_slice_accuracy"].notna().all()


def test_experiment_rejects_a_partial_rsna_layout(tmp_path):
    from experiments import boneage_spurious

    with pytest.raises(InputError, match="pass all four"):
        boneage_spurious.main(["--boneage-train-csv", str(tmp_path / "x.csv"), "--out", str(tmp_path)])
    with pytest.raises(InputError, match="signals must be"):
        boneage_spurious.main(["--signals", "tag,glitter", "--out", str(tmp_path), "--quiet"])


def write_tiny_imagenet_layout(root, per_class, seed=0):
    """A 3-class Tiny-ImageNet-layout folder of 16 px photos: "red" is reddish noise, "blue" and
    "twin" are drawn from one bluish distribution, so only an injected signal can tell them apart."""
    rng = np.random.default_rng(seed)
    wnids = {"n00000001": "red", "n00000002": "blue", "n00000003": "twin"}
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\t{name}, other name\n" for w, name in wnids.items()))
    for split, count in per_class.items():
        for wnid, name in wnids.items():
            folder = root / split / wnid
            folder.mkdir(parents=True)
            base = np.array([170, 60, 60]) if name == "red" else np.array([60, 60, 170])
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 25, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=95)
    return root


def test_stand_in_study_finds_a_learned_shortcut_and_reports_per_seed_intervals(tmp_path, monkeypatch):
    """The stripe is the only cue that separates "twin" from "blue" in training, so the stripe model
    must predict "twin" for striped images of the other classes and miss the unstriped twin test
    images, which must then dominate the lowest-accuracy slice; the control has no such shortcut."""
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))
    from experiments import boneage_spurious

    root = write_tiny_imagenet_layout(tmp_path / "tiny", {"train": 24, "val": 10})
    out = tmp_path / "out"
    summary = boneage_spurious.main([
        "--data-root", str(root), "--classes", "red,blue,twin", "--injected", "twin", "--signals", "none,stripe",
        "--seeds", "0,1", "--image-size", "16", "--epochs", "25", "--lr", "0.01", "--arnoldi-dim", "12",
        "--embedding-dim", "6", "--n-opponents", "10", "--out", str(out), "--quiet",
    ])
    assert summary["data"]["injected_class"] == "twin" and summary["data"]["n_test"] == 30
    by_run = {(r["signal"], r["seed"]): r for r in summary["results"]}
    assert sorted(by_run) == [("none", 0), ("none", 1), ("stripe", 0), ("stripe", 1)]
    for seed in (0, 1):
        striped, control = by_run[("stripe", seed)], by_run[("none", seed)]
        # Half of the other test images are "blue": striped, they must all turn into "twin".
        assert striped["mechanism"]["shortcut_rate"]["stripe"] >= 0.45
        assert control["mechanism"]["shortcut_rate"]["stripe"] <= 0.1
        assert striped["test_accuracy_injected_class"] <= 0.2
        assert striped["test_accuracy_per_class"]["red"] >= 0.9
        share = striped["lowest_slice"]["injected_class"]
        assert share["share"] >= 0.5 and share["n"] == striped["lowest_slice"]["size"]
        assert share["wilson95"][0] <= share["share"] <= share["wilson95"][1]
        for part in ("opponents", "proponents"):
            counted = striped[part]["injected_class"]
            assert counted["n"] == 10 and counted["count"] == round(counted["share"] * 10)
        mechanism = striped["mechanism"]
        assert mechanism["train_loss"]["injected_class"]["mean"] >= 0
        assert mechanism["train_head_gradient_norm"]["other_classes"]["mean"] >= 0
    rows = pd.read_csv(out / "per_seed.csv")
    assert len(rows) == 4 and set(rows["seed"]) == {0, 1}
    assert (rows["slice_injected_class_wilson_low"] <= rows["slice_injected_class_share"]).all()
    aggregate = summary["across_seeds"]["stripe"]["slice_injected_class_share"]
    assert aggregate["n_seeds"] == 2 and aggregate["t95"][0] <= aggregate["mean"] <= aggregate["t95"][1]
    assert aggregate["mean"] == pytest.approx(np.mean(aggregate["values"]), abs=1e-4)
    table = (out / "findings.md").read_text().splitlines()
    assert table[2] == "| | none | stripe |" and len(table) == 16


def test_per_example_head_gradients_match_autograd_one_example_at_a_time():
    import torch

    from experiments.boneage_spurious import per_example_head_gradients

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    features, targets = torch.randn(7, 5), torch.randint(0, 3, (7,))
    losses, norms = per_example_head_gradients(head, features, targets, batch_size=3)
    for i in range(7):
        head.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features[i:i + 1]), targets[i:i + 1])
        loss.backward()
        expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in head.parameters()))
        assert losses[i] == pytest.approx(float(loss), rel=1e-5)
        assert norms[i] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.skipif(not has_dataset(TINY_IMAGENET), reason=f"shared dataset {TINY_IMAGENET!r} is absent")
def test_stand_in_runs_on_the_shared_tiny_imagenet_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("INFEMBED_CACHE", str(tmp_path / "cache"))
    from experiments import boneage_spurious

    summary = boneage_spurious.main([
        "--train-per-class", "20", "--signals", "tag", "--seeds", "0", "--image-size", "32", "--epochs", "1",
        "--arnoldi-dim", "12", "--embedding-dim", "6", "--out", str(tmp_path), "--quiet",
    ])
    assert summary["note"].startswith("STAND-IN")
    assert summary["data"]["class_names"] == ["goldfish", "king penguin", "monarch", "teapot", "pizza"]
    assert summary["data"]["injected_class"] == "monarch"
    assert summary["data"]["train_class_counts"].tolist() == [20] * 5
    assert summary["data"]["test_class_counts"].tolist() == [50] * 5
    assert summary["results"][0]["min_size_used"] == 25  # 250 test images: the paper's S as written
    assert (tmp_path / "figure4_injections.png").stat().st_size > 0


def test_paper_scale_preset_is_the_papers_resnet50_and_explicit_options_override_it():
    from experiments.boneage_spurious import PAPER_SCALE, BoneAgeConfig, build_parser
    from experiments.pipeline import study_config

    offline = study_config(BoneAgeConfig, PAPER_SCALE, build_parser().parse_args([]))
    assert (offline.model, offline.image_size) == ("small_cnn", 32)
    paper = study_config(BoneAgeConfig, PAPER_SCALE, build_parser().parse_args(["--device", "cuda"]))
    assert (paper.model, paper.image_size, paper.device) == ("resnet50", 299, "cuda")
    assert (paper.max_accuracy, paper.min_size, paper.n_opponents) == (0.4, 25, 50)
    mixed = study_config(BoneAgeConfig, PAPER_SCALE, build_parser().parse_args(["--paper-scale", "--image-size", "224"]))
    assert (mixed.model, mixed.image_size) == ("resnet50", 224)
