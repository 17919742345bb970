"""A fresh clone has no data folder: the main job still runs to the end on PyPI-shipped data,
says which cells it could not run and why, and labels its Table 1 as a fallback; a case study
without its dataset says which one and how to fetch it, in one line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.paths import REPO_ROOT


def test_table1_runs_with_an_empty_data_folder(tmp_path):
    data, cache, out = tmp_path / "data", tmp_path / "cache", tmp_path / "results"
    data.mkdir()
    env = {**os.environ, "INFEMBED_DATA": str(data), "INFEMBED_CACHE": str(cache), "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("INFEMBED_DOWNLOAD", None)
    committed = {p.name: p.read_bytes() for p in (REPO_ROOT / "results").glob("table1*")}
    # The real entry point, as `make reproduce-table1` runs it, on 2 problems per cell.
    result = subprocess.run([sys.executable, "-m", "experiments.table1", "--problems", "2", "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for input_type, dataset in (("medical images", "covid-chestxray"), ("medical time series", "timeseries")):
        assert f"not run: {input_type}: no {dataset!r} folder in the data folder {data}" in result.stderr
    assert "scikit-learn digits" in result.stderr

    table = (out / "table1.md").read_text()
    assert table.splitlines()[0].startswith("# Table 1 on the offline mini-dcbench — FALLBACK run without the data folder")
    not_run = table.split("## Cells not run", 1)[1].split("\n\n")[1]
    assert not_run.count("(rare, correlation, noisy label)") == 2 and "make data" in not_run
    assert "(natural images): scikit-learn digits 8x8, upsampled to MNIST's 28x28" in table
    # Every method has a number in every natural-image cell; the skipped input types have none.
    rows = [line for line in table.split("## InfEmbed against")[0].splitlines()
            if line.startswith("| natural images |")]
    assert len(rows) >= 8 and all("n/a" not in row for row in rows)
    assert "| medical" not in table
    assert (out / "table1.csv").is_file() and (out / "table1_problems.csv").is_file()
    # The committed results are untouched.
    assert {p.name: p.read_bytes() for p in (REPO_ROOT / "results").glob("table1*")} == committed


@pytest.mark.parametrize("study, dataset", [("agnews_bert", "agnews"), ("covid_xray", "covid-chestxray"),
                                            ("imagenet_resnet18", "tiny-imagenet-subset"),
                                            ("boneage_spurious", "tiny-imagenet-subset")])
def test_a_case_study_without_its_data_says_so_in_one_line_and_exits_2(tmp_path, study, dataset):
    env = {**os.environ, "INFEMBED_DATA": str(tmp_path), "INFEMBED_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("INFEMBED_DOWNLOAD", None)
    env.pop("INFEMBED_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", f"experiments.{study}", "--quiet", "--out", str(tmp_path / "out")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"python -m experiments.{study}: error: dataset {dataset!r} not found at {tmp_path / dataset}. Fetch it with "
        f"`make data` (or `python -m harness.data.download {dataset}`, or INFEMBED_DOWNLOAD=1 to fetch on first use), "
        "or set INFEMBED_DATA to the folder holding it (README.md, section Data)."]
    assert not (tmp_path / "out").exists()
