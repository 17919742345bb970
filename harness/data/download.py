"""Fetch the experiments' datasets from their public sources into the data folder.

``make data`` (``python -m harness.data.download [NAME ...]``) fetches every dataset that is
not there yet; with ``INFEMBED_DOWNLOAD=1`` a loader fetches a missing dataset on first use
(:func:`harness.paths.dataset_dir`). Each dataset folder holds what ``../shared/data/README.md``
describes, from the sources it names:

- ``mnist``: the MNIST test files from torchvision's mirrors, checked against torchvision's md5s;
- ``timeseries``, ``agnews``: files of the GitHub repositories at the commits the README
  records, byte-identical, checked against its md5s;
- ``covid-chestxray``: the images of the README's repository at its commit, each checked
  against its source md5 and then downscaled exactly as the README says (Lanczos to a
  shorter side of 256 px, JPEG quality 90 / optimised PNG): :func:`downscale_xray`;
- ``tiny-imagenet-subset``: the official Tiny-ImageNet archive (its published md5), from
  which the README's 30 classes are laid out as an ImageFolder: :func:`tiny_imagenet_subset`.

Downloads go to ``<data>/.downloads/<name>/``: a file is written as ``<file>.part``, resumed
with an HTTP Range request after an interruption, and renamed to its name only once its md5
matches; a mismatch deletes it. A dataset folder is assembled in a hidden staging folder and
renamed into place when complete, so a half-fetched dataset is never seen as present. The
assembled files are then compared with the reference md5s of the shared folder
(``harness/data/manifests/``); where a transformation's bytes depend on the Pillow build
(the re-encoded X-rays), a difference is reported as a warning, not an error.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from tqdm.auto import tqdm

from harness.errors import InputError, warn_caller
from harness.io import publish

MANIFESTS = Path(__file__).resolve().parent / "manifests"
GITHUB_RAW = "https://raw.githubusercontent.com"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # the published md5 of the official archive
DOWNLOADS = ".downloads"
_CHUNK = 1 << 20
_MAX_RESUMES = 5  # per mirror: resumptions of a transfer cut off after some progress


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: its path in the downloads folder, its mirrors, its md5."""

    path: str
    urls: tuple[str, ...]
    md5: str


@dataclass(frozen=True)
class DatasetSource:
    """A dataset folder of the data folder and how to fetch it.

    prepare : (source, downloads folder, staging folder, progress) -> None; lays the verified
        downloads out in the staging folder. reference : relative path -> md5 of a file, or of a folder's
        md5 listing (:func:`folder_digest`), that the assembled folder should match.
    """

    name: str
    summary: str
    terms: str
    size: str
    files: tuple[RemoteFile, ...]
    prepare: Callable[["DatasetSource", Path, Path, bool], None]
    reference: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- downloading one file
def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _transfer(url: str, part: Path, progress: bool, timeout: float) -> None:
    """Appends ``url``'s bytes to ``part`` from its current size on (Range request)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the part file is complete
            return
        raise
    with response:
        if offset and response.status != 206:  # the server ignored the Range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as handle, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
            desc=part.name.removesuffix(".part"), disable=not progress,
        ) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                handle.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def _from_mirrors(remote: RemoteFile, part: Path, progress: bool, timeout: float, failures: list[str]) -> str | None:
    """Completes ``part`` from the first mirror that serves it; the URL, or None if none did.
    A transfer cut off after some progress is resumed from the same mirror."""
    for url in remote.urls:
        for _ in range(_MAX_RESUMES + 1):
            before = part.stat().st_size if part.exists() else 0
            try:
                _transfer(url, part, progress, timeout)
                return url
            except (urllib.error.HTTPError, ValueError) as exc:  # this mirror does not serve the file
                failures.append(f"{url}: {exc}")
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # offline or cut off
                failures.append(f"{url}: {getattr(exc, 'reason', exc)!s}")
                if not part.exists() or part.stat().st_size <= before:
                    break
    return None


def download_file(remote: RemoteFile, folder: Path, dataset: str, progress: bool = True,
                  timeout: float = 60.0) -> Path:
    """``folder / remote.path``, downloaded (resuming a ``.part`` file) and md5-checked unless
    already there and intact."""
    path = folder / remote.path
    if path.is_file() and md5sum(path) == remote.md5:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    failures: list[str] = []
    url = _from_mirrors(remote, part, progress, timeout, failures)
    if url is None:
        raise InputError(
            f"{dataset}: could not download {remote.path} ({'; '.join(failures)}). Offline? Fetch "
            f"{' or '.join(remote.urls)} by hand and place it at {path} (md5 {remote.md5}), then rerun `make data`; "
            "or place the dataset folder itself in the data folder (README.md, section Data)."
        )
    found = md5sum(part)
    if found != remote.md5:
        part.unlink()
        raise InputError(
            f"{dataset}: {remote.path} from {url} has md5 {found}, expected {remote.md5}; the download was deleted. "
            f"The source changed or the transfer was corrupted: retry, or place a verified copy by hand at {path}."
        )
    publish(part, path)
    return path


# ---------------------------------------------------------------- checking assembled folders
def folder_digest(root: Path, folder: str) -> str:
    """md5 of the ``md5sum``-style listing (``<md5>  <path>`` lines, sorted by path, paths
    relative to ``root``) of every file under ``root / folder``: one checksum for a folder."""
    files = sorted(p for p in (root / folder).rglob("*") if p.is_file())
    listing = "".join(f"{md5sum(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
    return hashlib.md5(listing.encode()).hexdigest()


def reference_differences(root: Path, reference: Mapping[str, str]) -> list[str]:
    """Paths under ``root`` whose md5 (files) or :func:`folder_digest` (folders) differs."""
    out = []
    for relative, expected in reference.items():
        path = root / relative
        if not path.exists():
            out.append(f"{relative} (missing)")
        elif (md5sum(path) if path.is_file() else folder_digest(root, relative)) != expected:
            out.append(relative)
    return out


def read_manifest(name: str) -> list[list[str]]:
    """The rows of ``manifests/<name>.tsv`` (``#`` lines are comments)."""
    lines = (MANIFESTS / f"{name}.tsv").read_text().splitlines()
    return [line.split("\t") for line in lines if line and not line.startswith("#")]


# ---------------------------------------------------------------- preparing dataset folders
def move_verbatim(source: DatasetSource, downloads: Path, staging: Path, progress: bool = False) -> None:
    """The downloads are the dataset's files, unchanged."""
    for remote in source.files:
        target = staging / remote.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(downloads / remote.path, target)


def downscale_xray(raw: Path, out: Path, shorter_side: int = 256) -> None:
    """One X-ray as the shared folder holds it: an image whose shorter side is over
    ``shorter_side`` px is resized to it (aspect kept, Lanczos); RGBA loses its alpha and palette
    images become RGB; ``.jpg``/``.jpeg`` names are saved as JPEG quality 90, ``.png`` as an
    optimised PNG. An image needing none of this is copied byte for byte."""
    from PIL import Image

    jpeg = out.suffix.lower() in (".jpg", ".jpeg")
    with Image.open(raw) as image:
        image.load()
        width, height = image.size
        converted = image.convert("RGB") if image.mode in ("RGBA", "P") else image
        resize = min(width, height) > shorter_side
        if not resize and converted is image and image.format == ("JPEG" if jpeg else "PNG"):
            shutil.copyfile(raw, out)
            return
        if resize:
            scale = shorter_side / min(width, height)
            size = (shorter_side, round(height * scale)) if width <= height else (round(width * scale), shorter_side)
            converted = converted.resize(size, Image.LANCZOS)
        if jpeg:
            converted.save(out, "JPEG", quality=90)
        else:
            converted.save(out, "PNG", optimize=True)


def covid_downscaled(source: DatasetSource, downloads: Path, staging: Path, progress: bool = True) -> None:
    for remote in tqdm(source.files, desc=f"{source.name}: downscaling", unit="file", leave=False, disable=not progress):
        target = staging / remote.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if remote.path.startswith("images/"):
            downscale_xray(downloads / remote.path, target)
        else:
            os.replace(downloads / remote.path, target)


def tiny_imagenet_subset(source: DatasetSource, downloads: Path, staging: Path, progress: bool = True) -> None:
    """The official archive's train and val images of the 30 classes of ``wnids.txt`` (from the
    reference manifest) as an ImageFolder: ``train/<wnid>/<file>``, ``val/<wnid>/<file>`` (val
    placed by ``val_annotations.txt``), ``wnids.txt`` sorted, ``words.txt`` their lines."""
    wnids = tiny_imagenet_classes()
    archive_path = downloads / source.files[0].path
    with zipfile.ZipFile(archive_path) as archive:
        root = "tiny-imagenet-200/"
        names = archive.namelist()
        present = set(names)

        def require(member: str) -> str:
            if member not in present:
                raise InputError(f"{archive_path} has no {member}: it is not the Tiny-ImageNet archive")
            return member

        def copy(member: str, target: Path) -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(require(member)) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)

        for wnid in tqdm(wnids, desc=f"{source.name}: train classes", leave=False, disable=not progress):
            prefix = f"{root}train/{wnid}/images/"
            members = [n for n in names if n.startswith(prefix) and n.endswith(".JPEG") and "/" not in n[len(prefix):]]
            if not members:
                require(f"{prefix}{wnid}_0.JPEG")
            for member in members:
                copy(member, staging / "train" / wnid / member[len(prefix):])
        wanted = set(wnids)
        for line in archive.read(require(f"{root}val/val_annotations.txt")).decode().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[1] in wanted and "/" not in fields[0]:
                copy(f"{root}val/images/{fields[0]}", staging / "val" / fields[1] / fields[0])
        words = [line for line in archive.read(require(f"{root}words.txt")).decode().splitlines()
                 if line.split("\t", 1)[0] in wanted]
    (staging / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (staging / "words.txt").write_text("".join(f"{w}\n" for w in words))


def tiny_imagenet_classes() -> list[str]:
    """The 30 wnids of the shared subset, sorted (their train folders in the manifest)."""
    return sorted(path.split("/")[1] for path, *_ in read_manifest("tiny-imagenet-subset")
                  if path.startswith("train/"))


# ---------------------------------------------------------------- the registry
def _github(repo: str, commit: str, base: str, files: Mapping[str, tuple[str, str]]) -> tuple[RemoteFile, ...]:
    """Files of ``repo`` at ``commit``: local path -> (path in the repository, md5)."""
    return tuple(RemoteFile(local, (f"{base}/{repo}/{commit}/{path}",), md5) for local, (path, md5) in files.items())


def mnist_source(mirrors: tuple[str, ...] | None = None) -> DatasetSource:
    from torchvision.datasets import MNIST

    mirrors = tuple(MNIST.mirrors) if mirrors is None else mirrors
    files = tuple(RemoteFile(name, tuple(m + name for m in mirrors), md5)
                  for name, md5 in MNIST.resources if name.startswith("t10k-"))
    return DatasetSource("mnist", "MNIST test set (10,000 digits), torchvision's mirrors and md5s",
                         "CC BY-SA 3.0 (LeCun, Cortes & Burges)", "1.6 MB", files, move_verbatim)


TIMESERIES_FILES = {  # local path -> md5 (shared README); uts/ or mts/ in mat-analysis/datasets
    "ECG200/ECG200_TRAIN.ts": "808875aeac1c358a90c630fe369327c4",
    "ECG200/ECG200_TEST.ts": "8953289f83e417446f910f2a8653a782",
    "ECG5000/ECG5000_TRAIN.ts": "a1465f2d667b157427fde903eaf2e533",
    "ECGFiveDays/ECGFiveDays_TRAIN.ts": "1cf9f11c56af8fe74ce1d93ad83ba652",
    "ECGFiveDays/ECGFiveDays_TEST.ts": "13e8f9614b9654795bda0e71bdcccb43",
    "TwoLeadECG/TwoLeadECG_TRAIN.ts": "6935e7f8d3b9a5fac0936769893f4c4e",
    "TwoLeadECG/TwoLeadECG_TEST.ts": "86773deefe2aa05403fc9b41c1e7b279",
    "FingerMovements/FingerMovements_TRAIN.ts": "9c29ef8253b497514007599cfe5b5439",
    "FingerMovements/FingerMovements_TEST.ts": "e442e2451a2f7e9d1561147decd80e2f",
    "ProximalPhalanxOutlineAgeGroup/ProximalPhalanxOutlineAgeGroup_TRAIN.ts": "82b11f20167cd3b0fdcd7f259af6c198",
    "ProximalPhalanxOutlineAgeGroup/ProximalPhalanxOutlineAgeGroup_TEST.ts": "6e39495f8f50526ed505f1cf29a87d46",
}


def timeseries_source(base: str = GITHUB_RAW) -> DatasetSource:
    files = {local: (f"{'mts' if local.startswith('FingerMovements/') else 'uts'}/{local}", md5)
             for local, md5 in TIMESERIES_FILES.items()}
    return DatasetSource(
        "timeseries", "6 UCR/UEA archive problems (.ts) from mat-analysis/datasets at f5057255",
        "UCR/UEA archive: free for research, cite the archive and the donors", "6.8 MB",
        _github("mat-analysis/datasets", "f50572553419e667e0bd89173a3e9cbe5b32a99d", base, files), move_verbatim)


def agnews_source(base: str = GITHUB_RAW) -> DatasetSource:
    files = {name: (f"data/ag_news_csv/{name}", md5) for name, md5 in (
        ("test.csv", "d52ea96a97a2d943681189a97654912d"),  # the published AG News test md5 (torchtext's)
        ("classes.txt", "eb57fd781a350c341c55d4dcfc46782a"),
        ("readme.txt", "3912d050577ebbb91edbbaa12edfbdae"))}
    return DatasetSource(
        "agnews", "AG News test split (7,600 texts) from suuuch/TransformerClassification at ba663f26",
        "research and other non-commercial use (the corpus's readme.txt)", "1.8 MB",
        _github("suuuch/TransformerClassification", "ba663f263ca24ed7efd6ccf6572418775c1f2da0", base, files),
        move_verbatim)


def covid_source(base: str = GITHUB_RAW) -> DatasetSource:
    rows = read_manifest("covid-chestxray")
    files = {path: (path, source_md5) for path, source_md5, _ in rows}
    return DatasetSource(
        "covid-chestxray", "COVID-19 chest X-ray collection (609 frontal images, downscaled here) from "
        "GeneralBlockchain/covid-19-chest-xray-lung-bounding-boxes-dataset at 103688cb",
        "per-image licenses (metadata.csv `license`), boxes CC BY 4.0; no diagnostic claims", "18 MB (279 MB downloaded)",
        _github("GeneralBlockchain/covid-19-chest-xray-lung-bounding-boxes-dataset",
                "103688cbcdd1bada8900b9a9b17fafa45c7ea368", base, files),
        covid_downscaled, reference={path: md5 for path, _, md5 in rows})


def tiny_imagenet_source(url: str = TINY_IMAGENET_URL, md5: str = TINY_IMAGENET_MD5) -> DatasetSource:
    return DatasetSource(
        "tiny-imagenet-subset", "30 Tiny-ImageNet classes as an ImageFolder, from the official archive",
        "ImageNet terms: non-commercial research and education", "66 MB (archive 248 MB)",
        (RemoteFile("tiny-imagenet-200.zip", (url,), md5),), tiny_imagenet_subset,
        reference={path: digest for path, digest in read_manifest("tiny-imagenet-subset")})


def registry() -> dict[str, DatasetSource]:
    sources = (mnist_source(), timeseries_source(), agnews_source(), covid_source(), tiny_imagenet_source())
    return {source.name: source for source in sources}


# ---------------------------------------------------------------- fetching a dataset
def fetch(source: DatasetSource, data: Path | None = None, progress: bool = True) -> Path:
    """The folder ``data / source.name``, downloaded and assembled unless already there."""
    from harness.paths import data_dir

    data = Path(data) if data is not None else data_dir()
    target = data / source.name
    if target.is_dir():
        return target
    downloads = data / DOWNLOADS / source.name
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{source.name}: cannot write to the data folder {data} ({exc}); "
                         "set INFEMBED_DATA to a writable folder") from exc
    many = len(source.files) > 1
    for remote in tqdm(source.files, desc=f"{source.name}: downloading", unit="file", disable=not (progress and many)):
        download_file(remote, downloads, source.name, progress=progress)
    staging = Path(tempfile.mkdtemp(dir=data, prefix=f".{source.name}."))
    try:
        source.prepare(source, downloads, staging, progress)
        differences = reference_differences(staging, source.reference)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(downloads, ignore_errors=True)
    if differences:
        from PIL import __version__ as pillow

        warn_caller(
            f"{source.name}: {len(differences)} of {len(source.reference)} files/folders differ in bytes from the "
            f"shared reference (the downloads themselves matched their md5s), e.g. {differences[:3]}; re-encoded "
            f"images depend on the Pillow build (the reference was reproduced with Pillow 13.0.0, here {pillow})"
        )
    return target


def fetch_named(name: str, data: Path | None = None, progress: bool = True) -> Path:
    sources = registry()
    if name not in sources:
        raise InputError(f"no downloadable dataset {name!r}; known: {sorted(sources)}")
    return fetch(sources[name], data, progress)


def main(argv: list[str] | None = None) -> int:
    sources = registry()
    parser = argparse.ArgumentParser(prog="python -m harness.data.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"datasets to fetch (default all: {', '.join(sources)})")
    parser.add_argument("--data", type=Path, default=None, help="data folder (default: INFEMBED_DATA, see harness.paths)")
    parser.add_argument("--list", action="store_true", help="list the datasets, their sources, terms and sizes")
    args = parser.parse_args(argv)
    if args.list:
        for source in sources.values():
            print(f"{source.name}: {source.summary}; {source.size}; terms: {source.terms}")
        return 0
    try:
        for name in args.names or list(sources):
            print(f"{name}: {fetch_named(name, args.data)}")
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
