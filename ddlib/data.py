"""Dataset registry: every dataset as whole-split tensors, normalised, loaded once onto a device.

``digits`` (scikit-learn's 8x8 handwritten digits) ships with scikit-learn and is the default,
so the quick notebooks never need the network. The others are the datasets of the papers
(Wang et al. 2018 use MNIST, CIFAR-10, USPS and SVHN; Cazenavette et al. 2022 use CIFAR-10/100)
and are read through ``torchvision.datasets`` from one data root (see :func:`data_root`), in
torchvision's own folder layout::

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/FashionMNIST/raw/...            (same names as MNIST)
    <root>/usps.bz2, <root>/usps.t.bz2
    <root>/train_32x32.mat, <root>/test_32x32.mat          (SVHN)
    <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    <root>/cifar-100-python/{train,test,meta}

Tiny ImageNet and the 128x128 ImageNet subsets of Cazenavette et al. 2022 (ImageNette, ImageWoof,
ImageFruit, ImageMeow, ImageSquawk, ImageYellow) are read from image folders by
:mod:`ddlib.imagefolders` (layouts there: ``<root>/tiny-imagenet-200/`` and an ImageNet-style
``<root>/imagenet/{train,val}/<wnid>/``), decoded once with PIL and cached as uint8 safetensors.

Conventions:

- Files are checked *before* torchvision is called; a missing file gives one
  :class:`DatasetNotFoundError` naming the folder and the files to place there. With
  ``download=True`` we first probe the download host (3 s timeout) so that an offline machine
  fails fast instead of hanging.
- MNIST / Fashion-MNIST may be given as the four original ``.gz`` files only. torchvision wants
  them extracted, so we decompress them (locally, no network) into a cache folder
  (``$DDLIB_CACHE`` or ``~/.cache/ddlib``), never into the data root, which may be shared or
  read-only.
- The CIFAR python batches are pickles. We read them with a restricted unpickler that can only
  rebuild plain containers and NumPy arrays (:class:`_ArrayOnlyUnpickler`): a file that asks for
  any other class or function is refused, so no code from the file can run. (torchvision would
  unpickle without restriction after an MD5 check; our reader also works for subsets and for the
  tiny files the tests write.)
- ``mean``/``std`` are computed per channel from the loaded *full* train split scaled to [0, 1]
  (not the published constants, and not affected by ``train_limit``), so that every dataset,
  including digits, is normalised the same way.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import os
import pickle
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "mnist", "fashion_mnist", "usps", "svhn", "cifar10", "cifar100",
            "tinyimagenet", "imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow")

# Spellings accepted by load_dataset, after lower-casing and dropping "-", "_", " ".
_ALIASES = {
    "digits": "digits", "sklearndigits": "digits",
    "mnist": "mnist",
    "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "usps": "usps",
    "svhn": "svhn",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "tinyimagenet": "tinyimagenet", "tiny": "tinyimagenet", "tinyimagenet200": "tinyimagenet",
    "imagenette": "imagenette", "imagewoof": "imagewoof", "imagefruit": "imagefruit",
    "imagemeow": "imagemeow", "imagesquawk": "imagesquawk", "imageyellow": "imageyellow",
}

# Where torchvision downloads each dataset from (probed before a download is attempted).
_DOWNLOAD_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "usps": "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
}

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py",
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}
_FOLDER_DATASETS = ("tinyimagenet", "imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk",
                    "imageyellow")  # read by ddlib.imagefolders, not torchvision
_DIGIT_NAMES = tuple(str(i) for i in range(10))
DIGITS_TEST_SIZE = 450  # digits split: 1347 train / 450 test, stratified, random_state=0


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they should be (and could not be downloaded)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a plot need to know about a dataset."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the [0,1]-scaled full train split
    std: tuple[float, ...]
    class_names: tuple[str, ...]


@dataclass(repr=False, eq=False)
class Dataset:
    """Whole splits as tensors on one device. Images are float32 (N, C, H, W), normalised
    with ``info.mean``/``info.std``; labels are int64 (N,)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    info: DatasetInfo

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.info.input_shape

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def denormalise(self, x: Tensor) -> Tensor:
        """Undo the normalisation: back to the [0, 1] pixel scale (for plotting, or for
        augmentations defined on pixels). Accepts (C, H, W) or (N, C, H, W)."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.info.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.info.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean

    def normalise(self, x01: Tensor) -> Tensor:
        """The inverse of :meth:`denormalise`: [0, 1] pixels to the model's input scale."""
        shape = (-1, 1, 1)
        mean = torch.tensor(self.info.mean, dtype=x01.dtype, device=x01.device).view(shape)
        std = torch.tensor(self.info.std, dtype=x01.dtype, device=x01.device).view(shape)
        return (x01 - mean) / std

    def __repr__(self) -> str:
        i = self.info
        return (f"Dataset({i.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"shape={i.input_shape}, classes={i.num_classes}, device={self.device})")


# --------------------------------------------------------------------------- locations


def data_root(root: str | Path | None = None) -> Path:
    """Where datasets live: ``root`` if given, else ``$DDLIB_DATA``, else ``<repo>/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("DDLIB_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "data"


def cache_root() -> Path:
    """Scratch space for files we derive from the data root (``$DDLIB_CACHE`` or ``~/.cache/ddlib``)."""
    env = os.environ.get("DDLIB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddlib"


def canonical_name(name: str) -> str:
    """Registered name for ``name`` (case and ``-``/``_`` insensitive); ValueError if unknown."""
    key = str(name).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(str(name).lower(), list(DATASETS) + list(_ALIASES), n=1, cutoff=0.5)
    hint = f" Did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.{hint}")


# --------------------------------------------------------------------------- file checks


def _expected_files(name: str, root: Path) -> tuple[Path, tuple[str, ...]]:
    """The folder a dataset must be in and the file names it must contain there."""
    if name in ("mnist", "fashion_mnist"):
        folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        return folder, tuple(f + ".gz" for f in _MNIST_FILES)
    if name == "usps":
        return root, ("usps.bz2", "usps.t.bz2")
    if name == "svhn":
        return root, ("train_32x32.mat", "test_32x32.mat")
    sub, files = _CIFAR_FILES[name]
    return root / sub, files


def _missing_files(name: str, root: Path) -> tuple[Path, list[str]]:
    folder, files = _expected_files(name, root)
    if name in ("mnist", "fashion_mnist"):
        # either the .gz or its extracted twin will do
        missing = [f for f in files if not (folder / f).is_file() and not (folder / f[:-3]).is_file()]
    else:
        missing = [f for f in files if not (folder / f).is_file()]
    return folder, missing


def _not_found_message(name: str, folder: Path, missing: list[str]) -> str:
    extra = " (for MNIST/Fashion-MNIST the extracted files without .gz also do)" if name in ("mnist", "fashion_mnist") else ""
    return (f"dataset {name!r} not found: place the files {', '.join(missing)} in the folder {folder}{extra}, "
            f"or pass download=True / set DDLIB_DATA to the data root that holds them.")


def _network_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True if a TCP connection to ``host`` opens within ``timeout`` seconds (DNS included:
    the probe runs in a daemon thread so that a hanging name lookup cannot block us)."""
    ok = threading.Event()

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except Exception:  # unreachable, refused, bad name, timed out: all mean "offline"
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def _ensure_files(name: str, root: Path, download: bool) -> bool:
    """Raise DatasetNotFoundError unless the files exist or a download may fetch them.
    Returns whether torchvision should be asked to download."""
    folder, missing = _missing_files(name, root)
    if not missing:
        return False
    message = _not_found_message(name, folder, missing)
    if not download:
        raise DatasetNotFoundError(message)
    url = urlsplit(_DOWNLOAD_URLS[name])
    host = url.hostname
    if not _network_reachable(host, port=url.port or (443 if url.scheme == "https" else 80)):
        raise DatasetNotFoundError(f"{message} The download was requested but failed: {host} is unreachable (offline?).")
    return True


# --------------------------------------------------------------------------- readers
# Each returns uint8 or float arrays (N, C, H, W) in [0, 255] (or [0, 1] for digits), int labels
# and class names, for the train and test split. No per-item PIL loop anywhere.


def _read_digits() -> tuple:
    """scikit-learn digits: 1797 images 8x8 with values 0..16, scaled by 1/16 to [0, 1].
    Split: ``train_test_split(test_size=450, stratify=y, random_state=0)`` -> 1347 / 450."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y, random_state=0)
    return (x[tr], y[tr], x[te], y[te], _DIGIT_NAMES, 1.0)


def _extract_gz(gz: Path, out: Path) -> None:
    """Decompress ``gz`` to ``out`` atomically (write a temp file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    try:
        with gzip.open(gz, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mnist_root(name: str, root: Path) -> Path:
    """A root that torchvision's MNIST class can read: ``root`` itself when the four files are
    extracted there, else a cache root into which the ``.gz`` files are decompressed once
    (keyed by the source folder, refreshed when a ``.gz`` is newer than its copy)."""
    cls = "MNIST" if name == "mnist" else "FashionMNIST"
    raw = root / cls / "raw"
    if all((raw / f).is_file() for f in _MNIST_FILES):
        return root
    key = hashlib.sha1(str(raw.resolve()).encode()).hexdigest()[:12]
    cached = cache_root() / f"{name}-{key}"
    for f in _MNIST_FILES:
        src = raw / f if (raw / f).is_file() else raw / (f + ".gz")
        dst = cached / cls / "raw" / f
        if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        if src.suffix == ".gz":
            _extract_gz(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return cached


def _read_torchvision(name: str, root: Path, download: bool) -> tuple:
    import torchvision.datasets as tvd

    if name in ("mnist", "fashion_mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        if download:  # torchvision downloads and extracts into <root>/<cls>/raw
            cls(str(root), train=True, download=True)
        tv_root = str(_mnist_root(name, root))
        tr, te = cls(tv_root, train=True), cls(tv_root, train=False)
        names = _DIGIT_NAMES if name == "mnist" else tuple(tr.classes)
        return (tr.data[:, None], tr.targets, te.data[:, None], te.targets, names, 255.0)
    if name == "usps":
        tr, te = tvd.USPS(str(root), train=True, download=download), tvd.USPS(str(root), train=False, download=download)
        return (tr.data[:, None], np.asarray(tr.targets), te.data[:, None], np.asarray(te.targets), _DIGIT_NAMES, 255.0)
    if name == "svhn":
        if download:  # torchvision fetches the two .mat files (and checks their MD5)
            tvd.SVHN(str(root), split="train", download=True), tvd.SVHN(str(root), split="test", download=True)
        return _read_svhn(root)
    if download:  # torchvision fetches and unpacks the official archive (and checks its MD5)
        (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(str(root), train=True, download=True)
    return _read_cifar(name, root)


def _read_svhn(root: Path) -> tuple:
    """SVHN's ``{train,test}_32x32.mat``: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with digit 0 stored as 10.

    Read with ``scipy.io.loadmat`` (a MATLAB container of arrays; nothing is executed). torchvision's
    reader would first insist on the full files' MD5, refusing subsets and the tiny files the tests write.
    """
    from scipy.io import loadmat

    def read(split):
        mat = loadmat(str(root / f"{split}_32x32.mat"))
        x = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))  # (N, C, H, W), as torchvision does
        y = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
        return x, np.where(y == 10, 0, y)

    x_tr, y_tr = read("train")
    x_te, y_te = read("test")
    return x_tr, y_tr, x_te, y_te, _DIGIT_NAMES, 255.0


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays, and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays and lists")


def _load_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = _ArrayOnlyUnpickler(f, encoding="latin1").load()  # the official files come from Python 2
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _read_cifar(name: str, root: Path) -> tuple:
    """CIFAR-10/100 python batches: rows of 3072 uint8 (1024 red, 1024 green, 1024 blue)."""
    sub, files = _CIFAR_FILES[name]
    folder = root / sub
    label_key = "labels" if name == "cifar10" else "fine_labels"
    meta_file, names_key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    train_files = [f for f in files if f.startswith("data_batch")] if name == "cifar10" else ["train"]
    test_file = "test_batch" if name == "cifar10" else "test"

    def read(batch_names):
        batches = [_load_batch(folder / b) for b in batch_names]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return x, y

    x_tr, y_tr = read(train_files)
    x_te, y_te = read([test_file])
    class_names = tuple(str(n) for n in _load_batch(folder / meta_file)[names_key])
    return x_tr, y_tr, x_te, y_te, class_names, 255.0


# --------------------------------------------------------------------------- subsets


def balanced_subset_indices(y: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices of ``n`` examples, as class-balanced as the data allows, deterministic in ``seed``.

    A seeded permutation ranks the examples within each class; we keep the ``n`` examples of
    lowest (rank, class), i.e. round-robin over classes, then return them in dataset order.
    """
    y = y.detach().cpu()
    if n >= len(y):
        return torch.arange(len(y))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    rank = torch.empty(len(y), dtype=torch.long)
    for c in torch.unique(y):
        members = perm[y[perm] == c]  # this class, in permuted order
        rank[members] = torch.arange(len(members))
    order = torch.argsort(rank * (int(y.max()) + 1) + y, stable=True)
    return torch.sort(order[:n]).values


def class_indices_per_class(y: Tensor, per_class: int, num_classes: int,
                            generator: torch.Generator | None = None) -> Tensor:
    """Indices of ``per_class`` random examples of each class, in blocks for classes 0..K-1.
    Deterministic for a given (CPU) ``generator``."""
    y_cpu = y.detach().cpu()
    blocks = []
    for c in range(num_classes):
        members = torch.nonzero(y_cpu == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than per_class={per_class}")
        blocks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(blocks) if blocks else torch.empty(0, dtype=torch.long)


def sample_per_class(x: Tensor, y: Tensor, per_class: int, num_classes: int,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``per_class`` random real examples of every class, e.g. to initialise a synthetic set
    (MTT initialises from real images). Returned as blocks for classes 0..K-1, each of
    ``per_class`` rows: ``y_sel == arange(K).repeat_interleave(per_class)``."""
    idx = class_indices_per_class(y, per_class, num_classes, generator).to(x.device)
    return x[idx].clone(), y.to(x.device)[idx].clone()


# --------------------------------------------------------------------------- entry point


def load_dataset(name: str = "digits", root: str | Path | None = None, device: str | torch.device = "cpu",
                 download: bool = False, train_limit: int | None = None,
                 test_limit: int | None = None) -> Dataset:
    """Load ``name`` (see :data:`DATASETS`) as normalised float32 tensors on ``device``.

    ``train_limit`` / ``test_limit`` keep a deterministic, class-balanced subset of that many
    examples (see :func:`balanced_subset_indices`) for quick runs; the normalisation constants
    are still those of the full train split.
    """
    name = canonical_name(name)
    device = torch.device(device)
    if name == "digits":
        parts = _read_digits()
    elif name in _FOLDER_DATASETS:  # image folders, decoded once and cached (ddlib.imagefolders)
        from ddlib.imagefolders import read_folder_dataset

        parts = read_folder_dataset(name, data_root(root), download)
    else:
        root_path = data_root(root)
        want_download = _ensure_files(name, root_path, download)
        try:
            parts = _read_torchvision(name, root_path, want_download)
        except (RuntimeError, OSError) as err:
            if isinstance(err, DatasetNotFoundError):
                raise
            folder, files = _expected_files(name, root_path)
            what = "the download failed" if want_download else "torchvision could not read them"
            raise DatasetNotFoundError(
                f"{_not_found_message(name, folder, list(files))} ({what}: {err})") from err
    x_tr, y_tr, x_te, y_te, class_names, scale = parts

    # Move the compact (uint8) arrays to the device first, convert there.
    def images(a) -> Tensor:
        t = a if isinstance(a, Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device).float().div_(scale).contiguous()

    def labels(a) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.int64).to(device)

    x_train, x_test = images(x_tr), images(x_te)
    y_train, y_test = labels(y_tr), labels(y_te)
    # per-channel statistics of the full train split (torch reduces float32 with pairwise
    # summation, accurate to ~1e-6 here, and without a float64 copy of the whole split)
    var, mean = torch.var_mean(x_train, dim=(0, 2, 3))
    std = var.sqrt()
    info = DatasetInfo(name=name, input_shape=tuple(x_train.shape[1:]), num_classes=len(class_names),
                       mean=tuple(mean.tolist()), std=tuple(std.tolist()), class_names=tuple(class_names))
    m, s = mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)
    x_train.sub_(m).div_(s)
    x_test.sub_(m).div_(s)

    if train_limit is not None:
        keep = balanced_subset_indices(y_train, int(train_limit), seed=0).to(device)
        x_train, y_train = x_train[keep].contiguous(), y_train[keep]
    if test_limit is not None:
        keep = balanced_subset_indices(y_test, int(test_limit), seed=1).to(device)
        x_test, y_test = x_test[keep].contiguous(), y_test[keep]
    return Dataset(x_train, y_train, x_test, y_test, info)
