"""The dataset downloaders against a loopback HTTP server serving small files in the real layouts:
resume, mirrors, checksum mismatch, offline, and each dataset's assembly into its folder."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import threading
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import download
from harness.data.download import RemoteFile, download_file, fetch
from harness.errors import InputError
from harness.paths import SHARED_DATA


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 with HTTP Range support. ``cut``:
    URL path -> bytes sent before the connection drops (once); ``ignore_range``: answer 200."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                header = self.headers.get("Range")
                server.requests.append((self.path, header))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = int(header.removeprefix("bytes=").split("-")[0]) if header and not server.ignore_range else 0
                if start >= len(data) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if self.path in server.cut:
                    body = body[: server.cut.pop(self.path)]
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FileServer() as running:
        yield running


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".part") or p.name.startswith("."))


# ---------------------------------------------------------------- one file
PAYLOAD = np.random.default_rng(0).bytes(300_000)


def test_an_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.cut["/a.bin"] = 100_000
    path = download_file(RemoteFile("a.bin", (server.url + "/a.bin",), md5(PAYLOAD)), tmp_path, "demo", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", None), ("/a.bin", "bytes=100000-")]
    assert leftovers(tmp_path) == []


def test_a_part_file_of_an_earlier_run_is_resumed(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:50_000])
    download_file(RemoteFile("a.bin", (server.url + "/a.bin",), md5(PAYLOAD)), tmp_path, "demo", progress=False)
    assert server.requests == [("/a.bin", "bytes=50000-")]
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD and leftovers(tmp_path) == []


def test_a_complete_part_file_is_accepted_when_the_server_has_nothing_left(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    download_file(RemoteFile("a.bin", (server.url + "/a.bin",), md5(PAYLOAD)), tmp_path, "demo", progress=False)
    assert server.requests == [("/a.bin", f"bytes={len(PAYLOAD)}-")]
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_a_server_ignoring_range_restarts_the_file(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes")
    download_file(RemoteFile("a.bin", (server.url + "/a.bin",), md5(PAYLOAD)), tmp_path, "demo", progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_an_intact_file_is_not_downloaded_again(server, tmp_path):
    (tmp_path / "a.bin").write_bytes(PAYLOAD)
    download_file(RemoteFile("a.bin", (server.url + "/a.bin",), md5(PAYLOAD)), tmp_path, "demo", progress=False)
    assert server.requests == []


def test_a_checksum_mismatch_is_a_clear_error_and_keeps_nothing(server, tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[1234] ^= 0xFF
    server.files["/a.bin"] = bytes(corrupt)
    with pytest.raises(InputError, match=rf"demo: a.bin from {server.url}/a.bin has md5 {md5(bytes(corrupt))}, "
                                         rf"expected {md5(PAYLOAD)}; the download was deleted"):
        download_file(RemoteFile("a.bin", (server.url + "/a.bin",), md5(PAYLOAD)), tmp_path, "demo", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_next_mirror_serves_what_the_first_lacks_and_resumes_the_part_file(server, tmp_path):
    server.files["/second/a.bin"] = PAYLOAD
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:1000])
    remote = RemoteFile("a.bin", (closed_port_url() + "/a.bin", server.url + "/first/a.bin",
                                  server.url + "/second/a.bin"), md5(PAYLOAD))
    assert download_file(remote, tmp_path, "demo", progress=False).read_bytes() == PAYLOAD
    assert server.requests == [("/first/a.bin", "bytes=1000-"), ("/second/a.bin", "bytes=1000-")]


def test_offline_names_the_dataset_the_url_and_how_to_place_the_file(tmp_path):
    url = closed_port_url() + "/t10k-images-idx3-ubyte.gz"
    with pytest.raises(InputError) as info:
        download_file(RemoteFile("t10k-images-idx3-ubyte.gz", (url,), "0" * 32), tmp_path, "mnist", progress=False)
    message = str(info.value)
    assert message.startswith("mnist: could not download t10k-images-idx3-ubyte.gz")
    assert f"Fetch {url} by hand and place it at {tmp_path / 't10k-images-idx3-ubyte.gz'}" in message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- datasets in their real layouts
def served(source, server: FileServer, contents: dict[str, bytes]):
    """``source`` with its files served from ``contents`` (its remote path -> bytes) and their md5s."""
    files = []
    for remote in source.files:
        url_path = remote.urls[-1].split("://", 1)[1].split("/", 1)[1]
        server.files["/" + url_path] = contents[remote.path]
        files.append(replace(remote, md5=md5(contents[remote.path])))
    return replace(source, files=tuple(files))


def idx(array: np.ndarray, magic: int) -> bytes:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def test_mnist_from_the_second_torchvision_style_mirror(server, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28))
    contents = {"t10k-images-idx3-ubyte.gz": idx(images, 2051), "t10k-labels-idx1-ubyte.gz": idx(np.arange(10), 2049)}
    source = served(download.mnist_source(mirrors=(closed_port_url() + "/", server.url + "/mnist/")), server, contents)
    assert [f.path for f in source.files] == list(contents)
    folder = fetch(source, tmp_path, progress=False)
    assert folder == tmp_path / "mnist" and sorted(p.name for p in tmp_path.iterdir()) == [".downloads", "mnist"]
    assert list((tmp_path / ".downloads").iterdir()) == []
    monkeypatch.setenv("INFEMBED_DATA", str(tmp_path))
    from harness.data.mnist import load_mnist

    loaded = load_mnist()
    np.testing.assert_array_equal(loaded.images, images)
    np.testing.assert_array_equal(loaded.labels, np.arange(10))


def ts_file(channels: int, labels: list[str]) -> bytes:
    rows = [":".join(",".join(f"{v:.3f}" for v in np.sin(np.arange(16) + i + c)) for c in range(channels)) + f":{label}"
            for i, label in enumerate(labels)]
    return ("# fixture\n@problemName demo\n@classLabel true 1 2\n@data\n" + "\n".join(rows) + "\n").encode()


def test_timeseries_from_the_repository_at_its_commit(server, tmp_path, monkeypatch):
    source = download.timeseries_source(base=server.url)
    contents = {f.path: ts_file(2 if f.path.startswith("FingerMovements") else 1, ["1", "2", "1"]) for f in source.files}
    assert server.url + "/mat-analysis/datasets/f50572553419e667e0bd89173a3e9cbe5b32a99d/mts/FingerMovements/" \
        "FingerMovements_TRAIN.ts" in [u for f in source.files for u in f.urls]
    fetch(served(source, server, contents), tmp_path, progress=False)
    monkeypatch.setenv("INFEMBED_DATA", str(tmp_path))
    from harness.data.timeseries import load_ucr

    series, labels = load_ucr("FingerMovements", "TEST")
    assert series.shape == (3, 2, 16) and list(labels) == ["1", "2", "1"]


def test_agnews_from_the_repository_at_its_commit(server, tmp_path):
    from harness.data.agnews import load_agnews

    contents = {"test.csv": b'"3","Wall St.","Bears claw back\\into the black."\n"4","Space","A probe."\n',
                "classes.txt": b"World\nSports\nBusiness\nSci/Tech\n", "readme.txt": b"AG's corpus\n"}
    folder = fetch(served(download.agnews_source(base=server.url), server, contents), tmp_path, progress=False)
    texts = load_agnews(folder)
    assert texts.texts == ("Wall St.. Bears claw back into the black.", "Space. A probe.")
    assert list(texts.labels) == [2, 3]


def image_bytes(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    rng = np.random.default_rng(len(mode) + size[0])
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "P": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    image = Image.fromarray(pixels, "L" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("P")
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_covid_xrays_are_checked_then_downscaled_as_the_shared_folder(server, tmp_path):
    contents = {
        "metadata.csv": b"patientid,sex,finding,view,filename\n1,F,COVID-19,PA,tall.jpg\n",
        "annotations/annotations.json": json.dumps({"images": []}).encode(),
        "images/tall.jpg": image_bytes("RGB", (400, 900), "JPEG"),  # shorter side 400 -> 256 x 576
        "images/alpha.png": image_bytes("RGBA", (600, 300), "PNG"),  # -> 512 x 256 RGB
        "images/palette.png": image_bytes("P", (200, 100), "PNG"),  # small: kept size, RGB
        "images/small.jpg": image_bytes("L", (200, 240), "JPEG"),  # small, as named: copied byte for byte
        "images/png-named.jpg": image_bytes("L", (300, 200), "PNG"),  # PNG bytes under a .jpg name: JPEG now
    }
    source = download.covid_source(base=server.url)
    source = replace(source, files=tuple(f for f in source.files if f.path in contents)
                     + tuple(RemoteFile(p, (f"{server.url}/x/{p}",), "") for p in contents if p.startswith("images/")))
    source = served(source, server, contents)
    expected_small = md5(contents["images/small.jpg"])
    source = replace(source, reference={"metadata.csv": md5(contents["metadata.csv"]), "images/small.jpg": expected_small,
                                        "images/tall.jpg": "0" * 32})
    with pytest.warns(UserWarning, match=r"covid-chestxray: 1 of 3 files/folders differ .*images/tall.jpg"):
        folder = fetch(source, tmp_path, progress=False)
    shapes = {}
    for name in ("tall.jpg", "alpha.png", "palette.png", "small.jpg", "png-named.jpg"):
        with Image.open(folder / "images" / name) as image:
            shapes[name] = (image.format, image.mode, image.size)
    assert shapes == {"tall.jpg": ("JPEG", "RGB", (256, 576)), "alpha.png": ("PNG", "RGB", (512, 256)),
                      "palette.png": ("PNG", "RGB", (200, 100)), "small.jpg": ("JPEG", "L", (200, 240)),
                      "png-named.jpg": ("JPEG", "L", (300, 200))}
    assert md5((folder / "images" / "small.jpg").read_bytes()) == expected_small
    assert (folder / "metadata.csv").read_bytes() == contents["metadata.csv"]


def tiny_imagenet_archive(wnids: list[str], extra: str) -> tuple[bytes, dict[str, bytes]]:
    """A zip in the official tiny-imagenet-200 layout (2 train and 1 val image per class, plus a
    class outside the subset) and the files the subset folder should hold."""
    buffer, expected, annotations = io.BytesIO(), {}, []
    with zipfile.ZipFile(buffer, "w") as archive:
        for k, wnid in enumerate(wnids + [extra]):
            for i in range(2):
                jpeg = image_bytes("RGB", (8 + k, 8), "JPEG")[:-2] + bytes([k, i]) + b"\xff\xd9"
                archive.writestr(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{i}.JPEG", jpeg)
                if wnid != extra:
                    expected[f"train/{wnid}/{wnid}_{i}.JPEG"] = jpeg
            archive.writestr(f"tiny-imagenet-200/train/{wnid}/{wnid}_boxes.txt", f"{wnid}_0.JPEG\t0\t0\t8\t8\n")
            val = image_bytes("L", (8, 8 + k), "JPEG")
            archive.writestr(f"tiny-imagenet-200/val/images/val_{k}.JPEG", val)
            annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t8\t8")
            if wnid != extra:
                expected[f"val/{wnid}/val_{k}.JPEG"] = val
        archive.writestr("tiny-imagenet-200/val/val_annotations.txt", "\n".join(annotations) + "\n")
        archive.writestr("tiny-imagenet-200/wnids.txt", "\n".join([extra] + wnids[::-1]) + "\n")
        words = ["n00000001\tentity"] + [f"{w}\tname of {w}, other" for w in sorted(wnids + [extra])]
        archive.writestr("tiny-imagenet-200/words.txt", "\n".join(words) + "\n")
    expected["wnids.txt"] = "".join(f"{w}\n" for w in sorted(wnids)).encode()
    expected["words.txt"] = "".join(f"{w}\tname of {w}, other\n" for w in sorted(wnids)).encode()
    return buffer.getvalue(), expected


def test_tiny_imagenet_subset_from_the_official_archive_layout(server, tmp_path):
    from harness.data.tiny_imagenet import tiny_imagenet

    wnids = download.tiny_imagenet_classes()
    assert len(wnids) == 30 and "n02085620" in wnids and wnids == sorted(wnids)
    archive, expected = tiny_imagenet_archive(wnids, extra="n02480855")
    source = download.tiny_imagenet_source(url=server.url + "/tiny-imagenet-200.zip", md5=md5(archive))
    server.files["/tiny-imagenet-200.zip"] = archive
    # The reference digests, computed here from the expected bytes (md5sum listing per folder).
    reference = {}
    for folder in {p.rsplit("/", 1)[0] for p in expected if "/" in p}:
        listing = "".join(f"{md5(expected[p])}  {p}\n" for p in sorted(p for p in expected if p.startswith(folder + "/")))
        reference[folder] = md5(listing.encode())
    reference.update({name: md5(expected[name]) for name in ("wnids.txt", "words.txt")})
    folder = fetch(replace(source, reference=reference), tmp_path, progress=False)  # no warning: all match
    found = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert found == expected
    assert len(tiny_imagenet("train", root=folder)) == 60 and len(tiny_imagenet("val", root=folder)) == 30


def test_an_archive_without_a_class_is_rejected_and_leaves_no_folder(server, tmp_path):
    wnids = download.tiny_imagenet_classes()
    archive, _ = tiny_imagenet_archive(wnids[1:], extra="n02480855")
    server.files["/tiny-imagenet-200.zip"] = archive
    source = download.tiny_imagenet_source(url=server.url + "/tiny-imagenet-200.zip", md5=md5(archive))
    with pytest.raises(InputError, match=rf"has no tiny-imagenet-200/train/{wnids[0]}/images/{wnids[0]}_0.JPEG: it is "
                                         "not the Tiny-ImageNet archive"):
        fetch(source, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".downloads"]


def test_a_failed_dataset_leaves_no_folder_and_keeps_verified_downloads(server, tmp_path):
    contents = {"t10k-images-idx3-ubyte.gz": b"images", "t10k-labels-idx1-ubyte.gz": b"labels"}
    source = served(download.mnist_source(mirrors=(server.url + "/mnist/",)), server, contents)
    del server.files["/mnist/t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(InputError, match="mnist: could not download t10k-labels-idx1-ubyte.gz"):
        fetch(source, tmp_path, progress=False)
    assert not (tmp_path / "mnist").exists()
    assert sorted(p.name for p in (tmp_path / ".downloads" / "mnist").iterdir()) == ["t10k-images-idx3-ubyte.gz"]
    server.files["/mnist/t10k-labels-idx1-ubyte.gz"] = b"labels"
    fetch(source, tmp_path, progress=False)
    assert server.requests[-1] == ("/mnist/t10k-labels-idx1-ubyte.gz", None)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(contents)


# ---------------------------------------------------------------- first use, CLI, the recorded checksums
def test_first_use_downloads_only_when_asked(server, tmp_path, monkeypatch):
    from harness import paths

    contents = {"test.csv": b'"1","t","d"\n', "classes.txt": b"World\n", "readme.txt": b"r\n"}
    source = served(download.agnews_source(base=server.url), server, contents)
    monkeypatch.setattr(download, "registry", lambda: {"agnews": source})
    monkeypatch.setenv("INFEMBED_DATA", str(tmp_path))
    monkeypatch.delenv("INFEMBED_DOWNLOAD", raising=False)
    with pytest.raises(InputError, match=r"dataset 'agnews' not found .* `make data`"):
        paths.dataset_dir("agnews")
    assert not paths.dataset_available("agnews") and server.requests == []
    monkeypatch.setenv("INFEMBED_DOWNLOAD", "1")
    assert paths.dataset_dir("agnews") == tmp_path / "agnews"
    assert (tmp_path / "agnews" / "test.csv").read_bytes() == contents["test.csv"]


def test_cli_lists_the_datasets_and_rejects_unknown_names(capsys, tmp_path):
    assert download.main(["--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("mnist", "timeseries", "agnews", "covid-chestxray", "tiny-imagenet-subset"):
        assert f"{name}: " in listed
    assert download.main(["imagenet-full", "--data", str(tmp_path)]) == 2
    assert "no downloadable dataset 'imagenet-full'" in capsys.readouterr().err


def test_a_dataset_already_present_is_left_alone(tmp_path):
    (tmp_path / "mnist").mkdir()
    assert fetch(download.mnist_source(mirrors=(closed_port_url() + "/",)), tmp_path, progress=False) == tmp_path / "mnist"


def shared_md5s(name: str) -> dict[str, str]:
    sums = SHARED_DATA / "MD5SUMS"
    if not sums.is_file():
        pytest.skip("the shared data's MD5SUMS is absent")
    rows = (line.rstrip("\n").split("  ", 1) for line in sums.read_text().splitlines())
    return {path[len(name) + 1:]: value for value, path in rows if path.startswith(name + "/")}


@pytest.mark.parametrize("name", ["mnist", "timeseries", "agnews"])
def test_verbatim_files_carry_the_shared_md5s(name):
    source = download.registry()[name]
    assert {f.path: f.md5 for f in source.files} == shared_md5s(name)


def test_the_covid_reference_is_the_shared_folder():
    source = download.registry()["covid-chestxray"]
    assert dict(source.reference) == shared_md5s("covid-chestxray")
    assert [f.path for f in source.files] == list(source.reference)


def test_the_tiny_imagenet_reference_is_the_shared_folder():
    expected = shared_md5s("tiny-imagenet-subset")
    reference = download.registry()["tiny-imagenet-subset"].reference
    for folder, digest in reference.items():
        if folder.endswith(".txt"):
            assert expected[folder] == digest
        else:
            listing = "".join(f"{expected[p]}  {p}\n" for p in sorted(p for p in expected if p.startswith(folder + "/")))
            assert md5(listing.encode()) == digest
    assert len(reference) == 62 and len(expected) == 16_502
