"""MNIST and Fashion-MNIST from their gzipped IDX files: find, verify, decode, batch.

Where the files are looked for, first match wins (a directory matches when it holds the four
``*-ubyte.gz`` files, directly or in a ``mnist/`` / ``fashion-mnist/`` subdirectory):

1. ``data_dir`` when given (then nothing else is searched);
2. the root named by the environment variable ``ONNXDNS_DATA_DIR``;
3. the defaults: MNIST ``<repository>/../shared/data/mnist`` then ``~/.cache/onnxdns/mnist``;
   Fashion-MNIST ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``)
   then ``~/.cache/onnxdns/fashion-mnist``.

Every file is checked before use: against the directory's ``SHA256SUMS`` (``sha256sum``
format, digest of the ``.gz`` file) when it lists the file, otherwise against the built-in
SHA256 of the file's *decompressed* content. The built-in digests are content digests because
copies of these data sets differ in their gzip wrapping only: the Debian package rewrote the
gzip headers of the upstream files, and ``shared/data/mnist`` was recompressed. Rebuilding the
upstream ``.gz`` files from the local copies reproduces all eight MD5s that MNIST and
Fashion-MNIST publish, so these digests identify the official data whatever the compression.

Decoded arrays are cached per process and handed out read-only.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from onnxdns.errors import OnnxdnsError

#: Environment variable naming a data root (holding ``mnist/`` and ``fashion-mnist/`` or the files).
DATA_DIR_ENV = "ONNXDNS_DATA_DIR"
SPLITS = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_REPO_ROOT = Path(__file__).resolve().parent.parent
_CACHE_ROOT = Path("~/.cache/onnxdns")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What onnxdns knows about one data set."""

    name: str
    classes: tuple[str, ...]
    #: SHA256 of each file's decompressed IDX content.
    sha256: dict[str, str]
    mirrors: tuple[str, ...]
    default_dirs: tuple[Path, ...]
    how_to_get: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        classes=tuple(str(d) for d in range(10)),
        sha256={
            "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        default_dirs=(_REPO_ROOT.parent / "shared" / "data" / "mnist", _CACHE_ROOT / "mnist"),
        how_to_get="copy the four *-ubyte.gz files there, set ONNXDNS_DATA_DIR, or use --download",
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot"),
        sha256={
            "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        default_dirs=(Path("/usr/share/datasets/fashion-mnist"), _CACHE_ROOT / "fashion-mnist"),
        how_to_get="run 'apt-get install dataset-fashion-mnist', set ONNXDNS_DATA_DIR, or use --download",
    ),
}
#: The built-in data sets' names: the one list every command and module takes them from.
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
#: What optimize/validate compare models on besides real data: random inputs or a built-in data set.
VALIDATION_CHOICES: tuple[str, ...] = ("random", *DATASET_NAMES)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split: ``images`` float32 [N, 1, 28, 28] in [0, 1], ``labels`` int64 [N].

    Arrays from :func:`load_dataset` are read-only views of a per-process cache.
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {self.split!r}, {len(self)} examples, images {tuple(self.images.shape)})"


_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise OnnxdnsError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                 download: bool = False) -> Dataset:
    """Load ``split`` ("train" or "test") of ``name`` ("mnist" or "fashion-mnist").

    ``download`` fetches missing files from the official mirrors (see :func:`download_dataset`)
    into ``data_dir`` (or ``$ONNXDNS_DATA_DIR/<name>``, else ``~/.cache/onnxdns/<name>``).
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise OnnxdnsError(f"unknown split '{split}'; use 'train' or 'test'")
    directory = find_dataset_dir(name, data_dir, download=download)
    image_file, label_file = (directory / f for f in FILES[split])
    key = (name, split, str(directory.resolve()), _stat_key(image_file), _stat_key(label_file))
    if key not in _CACHE:
        sums = read_sha256sums(directory)
        images = _decode_images(_read_verified(image_file, info, sums), str(image_file))
        labels = _decode_labels(_read_verified(label_file, info, sums), str(label_file))
        if images.shape[0] != labels.shape[0]:
            raise OnnxdnsError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
        if labels.size and int(labels.max()) >= len(info.classes):
            raise OnnxdnsError(f"{label_file}: label {int(labels.max())} out of range 0..{len(info.classes) - 1}")
        images.flags.writeable = False
        labels.flags.writeable = False
        _CACHE[key] = (images, labels)
    images, labels = _CACHE[key]
    return Dataset(name, split, images.view(), labels.view(), info.classes)


def find_dataset_dir(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The directory holding ``name``'s four files (see the module docstring for the order)."""
    info = dataset_info(name)
    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
    else:
        env = os.environ.get(DATA_DIR_ENV)
        roots = ([Path(env).expanduser()] if env else []) + [d.expanduser() for d in info.default_dirs]
    looked: list[str] = []
    for root in roots:
        for directory in (root / name, root):
            if all((directory / f).is_file() for pair in FILES.values() for f in pair):
                return directory
        looked.append(str(root))
    if download:
        if data_dir is not None:
            root = Path(data_dir).expanduser()
            target = root if root.name == name else root / name
        else:
            target = roots[0] / name if os.environ.get(DATA_DIR_ENV) else info.default_dirs[-1].expanduser()
        return download_dataset(name, target)
    raise OnnxdnsError(f"{name} data not found (looked in {', '.join(looked)}); {info.how_to_get}")


def read_sha256sums(directory: Path) -> dict[str, str]:
    """File name -> SHA256 from ``directory/SHA256SUMS`` (``sha256sum`` output); {} if absent."""
    path = directory / "SHA256SUMS"
    if not path.is_file():
        return {}
    sums = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise OnnxdnsError(f"{path}:{lineno}: not a 'sha256  filename' line")
        fname = parts[1].strip().lstrip("*")
        sums[fname.removeprefix("./")] = digest
    return sums


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _read_verified(path: Path, info: DatasetInfo, sums: dict[str, str]) -> bytes:
    """Read ``path``, check its checksum, return the decompressed content."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OnnxdnsError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.name in sums:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sums[path.name]:
            raise OnnxdnsError(f"{path}: checksum mismatch (SHA256 {digest[:16]}..., SHA256SUMS says "
                               f"{sums[path.name][:16]}...); the file is corrupt or was replaced")
        return _gunzip(raw, str(path))
    return verify_content(raw, path.name, info, str(path))


def verify_content(raw: bytes, fname: str, info: DatasetInfo, source: str) -> bytes:
    """Decompress ``raw`` and check it against the built-in digest of ``fname``; return the content."""
    content = _gunzip(raw, source)
    digest = hashlib.sha256(content).hexdigest()
    expected = info.sha256[fname]
    if digest != expected:
        raise OnnxdnsError(f"{source}: checksum mismatch (content SHA256 {digest[:16]}..., expected "
                           f"{expected[:16]}... for {info.name} {fname}); the file is corrupt or not the official data")
    return content


def _gunzip(raw: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise OnnxdnsError(f"{source}: not a valid gzip file ({e}); the file is corrupt or truncated") from None


def parse_idx(content: bytes, source: str) -> np.ndarray:
    """Decode an IDX file (big-endian header: 0, 0, type code, number of dimensions, sizes)."""
    if len(content) < 4 or content[:2] != b"\0\0":
        raise OnnxdnsError(f"{source}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = content[2], content[3]
    if code not in dtypes:
        raise OnnxdnsError(f"{source}: IDX type code 0x{code:02x} unknown")
    header = 4 + 4 * ndim
    if len(content) < header:
        raise OnnxdnsError(f"{source}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", content[4:header])
    dtype = np.dtype(dtypes[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(content) != expected:
        raise OnnxdnsError(f"{source}: IDX size {len(content)} bytes, header {tuple(dims)} implies {expected}")
    return np.frombuffer(content, dtype=dtype, offset=header).reshape(dims)


def _magic(content: bytes) -> int:
    return struct.unpack(">I", content[:4])[0] if len(content) >= 4 else -1


def _decode_images(content: bytes, source: str) -> np.ndarray:
    if _magic(content) != IMAGES_MAGIC:
        raise OnnxdnsError(f"{source}: not an IDX image file (magic {_magic(content)}, expected {IMAGES_MAGIC})")
    pixels = parse_idx(content, source)
    if pixels.shape[1:] != (28, 28):
        raise OnnxdnsError(f"{source}: images are {pixels.shape[1]}x{pixels.shape[2]}, expected 28x28")
    images = np.empty((pixels.shape[0], 1, 28, 28), dtype=np.float32)
    np.divide(pixels[:, None], np.float32(255), out=images)
    return images


def _decode_labels(content: bytes, source: str) -> np.ndarray:
    if _magic(content) != LABELS_MAGIC:
        raise OnnxdnsError(f"{source}: not an IDX label file (magic {_magic(content)}, expected {LABELS_MAGIC})")
    return parse_idx(content, source).astype(np.int64)


def download_dataset(name: str, dest_dir: str | os.PathLike, mirrors: Sequence[str] | None = None,
                     *, timeout: float = 60.0) -> Path:
    """Fetch ``name``'s four files into ``dest_dir`` (created if needed) and return it.

    Each file is tried on every mirror (base URLs; ``file://`` works too) in turn, verified
    against the built-in content digest, and written atomically. Files already present and
    valid are kept.
    """
    info = dataset_info(name)
    bases = list(mirrors) if mirrors else list(info.mirrors)
    dest = Path(dest_dir).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxdnsError(f"{dest}: cannot create the download folder: {e.strerror or e}") from None
    for fname in (f for pair in FILES.values() for f in pair):
        target = dest / fname
        if target.is_file():
            try:
                verify_content(target.read_bytes(), fname, info, str(target))
                continue
            except OnnxdnsError:
                pass  # replaced below
        failures = []
        for base in bases:
            url = base if base.endswith("/") else base + "/"
            url += fname
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "onnxdns"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    raw = response.read()
                verify_content(raw, fname, info, url)
            except (OSError, ValueError, http.client.HTTPException, OnnxdnsError) as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                failures.append(str(reason) if isinstance(e, OnnxdnsError) else f"{url}: {reason}")
                continue
            _write_atomic(target, raw)
            break
        else:
            raise OnnxdnsError(f"cannot download {name} {fname}: {'; '.join(failures)}")
    return dest


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int | None = None,
            rng: np.random.Generator | None = None, drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images, labels)`` batches; shuffled with ``rng`` (or a generator seeded by ``seed``)."""
    if batch_size <= 0:
        raise OnnxdnsError(f"batch size must be positive, got {batch_size}")
    if rng is not None and seed is not None:
        raise OnnxdnsError("batches: give seed or rng, not both")
    n = len(dataset)
    order = (rng if rng is not None else np.random.default_rng(seed)).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if order is None:
            yield dataset.images[start:end], dataset.labels[start:end]
        else:
            idx = order[start:end]
            yield dataset.images[idx], dataset.labels[idx]


def subset(dataset: Dataset, n: int, seed: int = 0) -> Dataset:
    """``n`` distinct examples drawn at random (reproducibly from ``seed``), in dataset order."""
    if not 0 < n <= len(dataset):
        raise OnnxdnsError(f"subset size must be 1..{len(dataset)}, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    return Dataset(dataset.name, dataset.split, dataset.images[idx], dataset.labels[idx], dataset.classes)
