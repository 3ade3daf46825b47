"""MNIST / Fashion-MNIST loaders on the real files: decoding, checksums, directories, file:// downloads."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from onnxdns import data
from onnxdns.errors import OnnxdnsError

ALL_FILES = [f for pair in data.FILES.values() for f in pair]


def _copy(name: str, dest: Path, *, sums: bool = False) -> Path:
    """Copy the four files of ``name`` (as found by the loader) into ``dest``."""
    src = data.find_dataset_dir(name)
    dest.mkdir(parents=True, exist_ok=True)
    for f in ALL_FILES + (["SHA256SUMS"] if sums else []):
        shutil.copyfile(src / f, dest / f)
    return dest


def _labels_idx(labels: np.ndarray) -> bytes:
    return struct.pack(">II", data.LABELS_MAGIC, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.mark.parametrize("name", list(data.DATASETS))
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_load_real_splits(name, split, count):
    ds = data.load_dataset(name, split)
    assert (ds.name, ds.split, len(ds)) == (name, split, count)
    assert ds.images.shape == (count, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.labels.shape == (count,) and ds.labels.dtype == np.int64
    assert float(ds.images.min()) == 0.0 and float(ds.images.max()) == 1.0
    assert set(np.unique(ds.labels)) == set(range(10)) and len(ds.classes) == 10


def test_known_values():
    mnist = data.load_dataset("mnist", "train")
    assert mnist.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert abs(float(mnist.images.mean()) - 0.1307) < 1e-4
    fashion = data.load_dataset("fashion-mnist", "train")
    assert fashion.labels[:4].tolist() == [9, 0, 0, 3]
    assert fashion.classes[9] == "Ankle boot"
    assert np.bincount(fashion.labels).tolist() == [6000] * 10


# Upstream gzip headers (flags FNAME, mtime, OS=Unix) of the files Zalando publishes.
FASHION_UPSTREAM = {
    "train-images-idx3-ubyte.gz": (0x59A7E9DE, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": (0x59A7E9DE, "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": (0x59A7E9F3, "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": (0x59A7E9F3, "bb300cfdad3c16e7a12a480ee83cd310"),
}


def _deflate_body(raw: bytes) -> bytes:
    """A single-member gzip file without its header (RFC 1952 section 2.3)."""
    flags, pos = raw[3], 10
    if flags & 4:
        pos += 2 + int.from_bytes(raw[pos:pos + 2], "little")
    for bit in (8, 16):
        if flags & bit:
            pos = raw.index(b"\0", pos) + 1
    return raw[pos + (2 if flags & 2 else 0):]


def test_fashion_mnist_files_are_the_upstream_data():
    """The local copy differs from Zalando's files only in the gzip header: restoring that header
    reproduces the published MD5s, so the built-in content digests identify the official data."""
    directory = data.find_dataset_dir("fashion-mnist")
    for fname, (mtime, md5) in FASHION_UPSTREAM.items():
        header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03" + fname[:-3].encode() + b"\0"
        rebuilt = header + _deflate_body((directory / fname).read_bytes())
        assert hashlib.md5(rebuilt).hexdigest() == md5


def test_arrays_are_read_only_and_cache_survives_callers():
    first = data.load_dataset("mnist", "test")
    with pytest.raises(ValueError):
        first.images[0, 0, 0, 0] = 5.0
    with pytest.raises(ValueError):
        first.labels.flags.writeable = True
    again = data.load_dataset("mnist", "test")
    assert np.shares_memory(first.images, again.images)  # served from the cache
    assert float(again.images[0].max()) == 1.0 and again.labels[0] == 7


def test_env_var_root_with_subdirectory(tmp_path, monkeypatch):
    _copy("mnist", tmp_path / "root" / "mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "root"))
    assert data.find_dataset_dir("mnist") == tmp_path / "root" / "mnist"
    assert len(data.load_dataset("mnist", "test")) == 10000  # built-in digests (no SHA256SUMS)
    # A root without fashion-mnist falls through to the defaults.
    assert data.find_dataset_dir("fashion-mnist") != tmp_path / "root"


def test_explicit_dir_wins_over_env(tmp_path, monkeypatch):
    _copy("mnist", tmp_path / "files")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "empty"))
    assert data.find_dataset_dir("mnist", tmp_path / "files") == tmp_path / "files"
    assert data.load_dataset("mnist", "test", data_dir=tmp_path / "files").labels[:3].tolist() == [7, 2, 1]


def test_recompressed_copy_is_accepted(tmp_path):
    """Built-in digests cover the content, so any faithful re-gzip of the official files loads."""
    d = _copy("fashion-mnist", tmp_path / "f")
    for f in data.FILES["test"]:
        (d / f).write_bytes(gzip.compress(gzip.decompress((d / f).read_bytes()), compresslevel=1, mtime=0))
    assert data.load_dataset("fashion-mnist", "test", data_dir=d).labels[0] == 9


def test_corrupted_byte_is_rejected(tmp_path):
    d = _copy("mnist", tmp_path / "m")
    raw = bytearray((d / "t10k-images-idx3-ubyte.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(OnnxdnsError, match="t10k-images-idx3-ubyte.gz: (not a valid gzip|checksum mismatch)"):
        data.load_dataset("mnist", "test", data_dir=d)


def test_valid_gzip_with_other_content_is_rejected(tmp_path):
    d = _copy("mnist", tmp_path / "m")
    labels = data.load_dataset("mnist", "test").labels.copy()
    labels[0] = 3
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_labels_idx(labels)))
    with pytest.raises(OnnxdnsError, match="checksum mismatch .*not the official data") as err:
        data.load_dataset("mnist", "test", data_dir=d)
    assert "\n" not in str(err.value)


def test_sha256sums_file_is_used(tmp_path):
    d = _copy("mnist", tmp_path / "m", sums=True)
    assert len(data.load_dataset("mnist", "test", data_dir=d)) == 10000
    raw = bytearray((d / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw[4] ^= 0x01  # gzip mtime: content unchanged, file digest changed
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(OnnxdnsError, match="SHA256SUMS says"):
        data.load_dataset("mnist", "test", data_dir=d)


def test_malformed_sha256sums_line(tmp_path):
    d = _copy("mnist", tmp_path / "m")
    (d / "SHA256SUMS").write_text("not-a-digest  t10k-images-idx3-ubyte.gz\n")
    with pytest.raises(OnnxdnsError, match="SHA256SUMS:1: not a 'sha256  filename' line"):
        data.load_dataset("mnist", "test", data_dir=d)


@pytest.mark.parametrize("content,message", [
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x01\x02", r"t10k-labels-idx1-ubyte.gz: IDX size 10 bytes, header \(5,\) implies 13"),
    (b"PK\x03\x04rest", "not an IDX label file"),
    (struct.pack(">II", data.IMAGES_MAGIC, 1) + b"\0" * 784, "not an IDX label file"),
])
def test_bad_idx_files_give_one_line_errors(tmp_path, content, message):
    """Files whose checksums are vouched for by SHA256SUMS but whose IDX content is wrong."""
    d = _copy("mnist", tmp_path / "m")
    bad = gzip.compress(content)
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(bad)
    lines = [f"{hashlib.sha256((d / f).read_bytes()).hexdigest()}  {f}" for f in ALL_FILES]
    (d / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    with pytest.raises(OnnxdnsError, match=message) as err:
        data.load_dataset("mnist", "test", data_dir=d)
    assert "\n" not in str(err.value)


def test_parse_idx_header():
    payload = struct.pack(">IIII", data.IMAGES_MAGIC, 2, 3, 4) + bytes(range(24))
    arr = data.parse_idx(payload, "x")
    assert arr.shape == (2, 3, 4) and arr[1, 2, 3] == 23
    with pytest.raises(OnnxdnsError, match="bad magic"):
        data.parse_idx(b"\x01" + payload[1:], "x")
    with pytest.raises(OnnxdnsError, match="type code 0x07"):
        data.parse_idx(b"\x00\x00\x07\x01", "x")
    with pytest.raises(OnnxdnsError, match="header truncated"):
        data.parse_idx(payload[:10], "x")


def test_missing_directory_error(tmp_path):
    with pytest.raises(OnnxdnsError, match=f"mnist data not found \\(looked in {tmp_path / 'nope'}\\);.*--download"):
        data.load_dataset("mnist", "test", data_dir=tmp_path / "nope")


def test_nothing_found_anywhere_names_the_apt_package(tmp_path, monkeypatch):
    info = dataclasses.replace(data.DATASETS["fashion-mnist"], default_dirs=(tmp_path / "a", tmp_path / "b"))
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", info)
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(OnnxdnsError) as err:
        data.load_dataset("fashion-mnist")
    message = str(err.value)
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message


def test_unknown_names():
    with pytest.raises(OnnxdnsError, match="unknown dataset 'cifar10'; known datasets: mnist, fashion-mnist"):
        data.load_dataset("cifar10")
    with pytest.raises(OnnxdnsError, match="unknown split 'val'"):
        data.load_dataset("mnist", "val")


def test_download_over_file_urls(tmp_path):
    mirror = _copy("mnist", tmp_path / "mirror")
    dest = data.download_dataset("mnist", tmp_path / "dest", mirrors=[mirror.as_uri()])
    for f in ALL_FILES:
        assert (dest / f).read_bytes() == (mirror / f).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(ALL_FILES)  # no temporary files left
    assert len(data.load_dataset("mnist", "train", data_dir=dest)) == 60000


def test_download_rejects_a_corrupt_mirror_and_falls_back(tmp_path):
    good = _copy("mnist", tmp_path / "good")
    bad = _copy("mnist", tmp_path / "bad")
    raw = bytearray((bad / "train-labels-idx1-ubyte.gz").read_bytes())
    raw[-100] ^= 0xFF
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(bytes(raw))

    with pytest.raises(OnnxdnsError, match="cannot download mnist train-labels-idx1-ubyte.gz: .*(gzip|checksum)"):
        data.download_dataset("mnist", tmp_path / "only-bad", mirrors=[bad.as_uri() + "/"])
    assert not (tmp_path / "only-bad" / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "only-bad").iterdir() if p.name.endswith(".tmp")]

    dest = data.download_dataset("mnist", tmp_path / "both", mirrors=[bad.as_uri(), good.as_uri()])
    assert (dest / "train-labels-idx1-ubyte.gz").read_bytes() == (good / "train-labels-idx1-ubyte.gz").read_bytes()


def test_download_unreachable_mirror(tmp_path):
    with pytest.raises(OnnxdnsError, match="cannot download mnist .*nowhere"):
        data.download_dataset("mnist", tmp_path / "d", mirrors=[(tmp_path / "nowhere").as_uri()])


def test_load_with_download_flag(tmp_path, monkeypatch):
    mirror = _copy("fashion-mnist", tmp_path / "mirror")
    info = dataclasses.replace(data.DATASETS["fashion-mnist"], mirrors=(mirror.as_uri(),))
    monkeypatch.setitem(data.DATASETS, "fashion-mnist", info)
    ds = data.load_dataset("fashion-mnist", "test", data_dir=tmp_path / "data", download=True)
    assert len(ds) == 10000
    assert (tmp_path / "data" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


def test_batches():
    ds = data.subset(data.load_dataset("mnist", "test"), 100, seed=0)
    plain = list(data.batches(ds, 32))
    assert [len(y) for _, y in plain] == [32, 32, 32, 4]
    assert plain[0][0].shape == (32, 1, 28, 28)
    assert np.array_equal(np.concatenate([y for _, y in plain]), ds.labels)
    assert [len(y) for _, y in data.batches(ds, 32, drop_last=True)] == [32, 32, 32]

    a = np.concatenate([y for _, y in data.batches(ds, 32, shuffle=True, seed=1)])
    b = np.concatenate([y for _, y in data.batches(ds, 32, shuffle=True, rng=np.random.default_rng(1))])
    assert np.array_equal(a, b) and not np.array_equal(a, ds.labels)
    assert np.array_equal(np.sort(a), np.sort(ds.labels))
    with pytest.raises(OnnxdnsError, match="positive"):
        next(data.batches(ds, 0))
    with pytest.raises(OnnxdnsError, match="not both"):
        next(data.batches(ds, 8, shuffle=True, seed=1, rng=np.random.default_rng(1)))


def test_subset():
    full = data.load_dataset("fashion-mnist", "test")
    small = data.subset(full, 50, seed=3)
    assert len(small) == 50 and small.classes == full.classes
    assert np.array_equal(small.labels, data.subset(full, 50, seed=3).labels)
    # Each picked image is the full set's image with the same label.
    idx = [int(np.flatnonzero((full.images == img).all(axis=(1, 2, 3)))[0]) for img in small.images[:5]]
    assert full.labels[idx].tolist() == small.labels[:5].tolist()
    with pytest.raises(OnnxdnsError, match="subset size"):
        data.subset(full, 10001)
