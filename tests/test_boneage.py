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
from harness.errors import InputError


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
        "--embedding-dim", "6", "--n-opponents", "10", "--out", str(out), "--quiet",
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
        assert 0.0 <= lowest["injected_class_share"] <= 1.0
        assert result["opponents"]["k"] == 10 and result["proponents"]["k"] == 10
        rows = slices[slices["group"] == result["signal"]]
        assert len(rows) == result["n_slices"]
        assert rows["accuracy"].min() == pytest.approx(lowest["accuracy"], abs=1e-4)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["results"] == json.loads(json.dumps(summary["results"]))
    for name in ("figure4_injections.png", "figure5.png", "findings.csv", "slices.csv"):
        assert (out / name).stat().st_size > 0
    findings = pd.read_csv(out / "findings.csv")
    assert findings["signal"].tolist() == ["none", "stripe"]
    assert (findings["data"] == "RSNA Pediatric Bone Age").all()
    assert (findings["n_slices"] >= 1).all() and findings["lowest_slice_accuracy"].notna().all()


def test_experiment_rejects_a_partial_rsna_layout(tmp_path):
    from experiments import boneage_spurious

    with pytest.raises(InputError, match="pass all four"):
        boneage_spurious.main(["--boneage-train-csv", str(tmp_path / "x.csv"), "--out", str(tmp_path)])
    with pytest.raises(InputError, match="signals must be"):
        boneage_spurious.main(["--signals", "tag,glitter", "--out", str(tmp_path), "--quiet"])
