"""ImageNet-style image folders: Tiny ImageNet and the 128x128 ImageNet subsets of MTT.

Used through :func:`ddlib.data.load_dataset` (``"tinyimagenet"``, ``"imagenette"``, ...). The
folders live under the data root (:func:`ddlib.data.data_root`)::

    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG    200 classes x 500 images, 64x64
    <root>/tiny-imagenet-200/val/images/*.JPEG              10,000 images, labelled by
    <root>/tiny-imagenet-200/val/val_annotations.txt        "<file>\\t<wnid>\\t..." lines
        (val/images/<wnid>/*.JPEG, the re-sorted layout that MTT's code reads, also works)
    <root>/imagenet/train/<wnid>/*.JPEG    all 1000 ILSVRC-2012 class folders
    <root>/imagenet/val/<wnid>/*.JPEG      the 50,000 validation images sorted into class
                                           folders (the layout torchvision's ImageNet leaves)

Tiny ImageNet is the official archive unpacked; its val split is our test split (as in MTT).

The ImageNet subsets are those of Cazenavette et al. 2022 (MTT, sec. 4): ten classes each,
defined in MTT's code as ImageNet class *indices*, i.e. positions in the sorted list of the 1000
wnid folders (torchvision ``ImageFolder`` order). :data:`IMAGENET_SUBSETS` holds those indices
(GeorgeCazenavette/mtt-distillation, ``utils.py``, class ``Config``); we resolve them to wnids
from the user's own sorted ``train`` listing, which therefore must hold all 1000 class folders
(the folders of classes outside the subset may be empty). Label ``c`` is the ``c``-th index of
the list, as in MTT. Like MTT (issue #22 of its repository) we use the original ImageNet train
and validation splits, not fast.ai's later re-split of ImageNette/ImageWoof.

Images are decoded once with PIL (RGB; grey or CMYK files are converted), brought to the square
resolution (64 for Tiny ImageNet, which already is; 128 for the subsets) by :data:`RESIZE`, and
cached as uint8 safetensors under :func:`ddlib.data.cache_root`, keyed by the source folder and
by its file list (names, sizes, modification times): a changed folder is decoded again. A load
that finds its cache decodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

# name -> (ImageNet class indices in MTT's label order, English names in the same order)
IMAGENET_SUBSETS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
    "imagenette": ((0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
                   ("tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                    "garbage truck", "gas pump", "golf ball", "parachute")),
    "imagewoof": ((193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
                  ("Australian terrier", "Border terrier", "Samoyed", "beagle", "Shih-Tzu", "English foxhound",
                   "Rhodesian ridgeback", "dingo", "golden retriever", "Old English sheepdog")),
    "imagefruit": ((953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
                   ("pineapple", "banana", "strawberry", "orange", "lemon", "pomegranate", "fig", "bell pepper",
                    "cucumber", "Granny Smith")),
    "imagemeow": ((281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
                  ("tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "lion", "tiger", "jaguar",
                   "snow leopard", "lynx")),
    "imagesquawk": ((84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
                    ("peacock", "flamingo", "macaw", "pelican", "king penguin", "bald eagle", "toucan", "ostrich",
                     "black swan", "sulphur-crested cockatoo")),
    "imageyellow": ((309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
                    ("bee", "yellow lady's slipper", "banana", "lemon", "corn", "school bus", "honeycomb", "lion",
                     "garden spider", "goldfinch")),
}
FOLDER_DATASETS = ("tinyimagenet",) + tuple(IMAGENET_SUBSETS)

TINY_FOLDER = "tiny-imagenet-200"
IMAGENET_FOLDER = "imagenet"
TINY_SIZE = 64
SUBSET_SIZE = 128
IMAGENET_CLASSES = 1000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# How a non-square image becomes size x size: "crop" resizes the shorter side to size (bilinear,
# as torchvision's Resize(size) on a PIL image) and takes the centre square (CenterCrop(size));
# "squash" resizes both sides to size, ignoring the aspect ratio, which is what MTT's code does
# (transforms.Resize((128, 128)) then a no-op CenterCrop). Part of the cache key.
RESIZE = "crop"
_CACHE_FORMAT = "1"

_TINY_LAYOUT = ("train/<wnid>/images/*.JPEG (one folder per class), val/images/*.JPEG and "
                "val/val_annotations.txt: the official tiny-imagenet-200.zip unpacked")
_IMAGENET_LAYOUT = ("train/<wnid>/*.JPEG with all 1000 ILSVRC-2012 class folders (n01440764 ... n15075141) "
                    "and val/<wnid>/*.JPEG (the validation images sorted into the same class folders, "
                    "as torchvision's ImageNet class leaves them)")


def _not_found(name: str, folder: Path, what: str, layout: str) -> Exception:
    from ddlib.data import DatasetNotFoundError

    return DatasetNotFoundError(
        f"dataset {name!r} not found: {what}. Place in the folder {folder}: {layout}; "
        f"or set DDLIB_DATA / pass root= to the data root that holds {folder.name}/. "
        f"It cannot be downloaded automatically.")


def _images_in(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder``, sorted by path (deterministic order)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


# --------------------------------------------------------------------------- decoding


def fit_square(img, size: int, mode: str = RESIZE):
    """A PIL image brought to ``size`` x ``size`` (see :data:`RESIZE`); unchanged if already so."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    if mode == "squash":
        return img.resize((size, size), Image.BILINEAR)
    if mode != "crop":
        raise ValueError(f"unknown resize mode {mode!r}; use 'crop' or 'squash'")
    if w <= h:  # torchvision Resize(size): shorter side -> size, longer side truncated
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))  # CenterCrop
    return img.crop((left, top, left + size, top + size))


def _decode(path: Path, size: int, mode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        rgb = fit_square(img.convert("RGB"), size, mode)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)  # HWC -> CHW


def decode_images(paths: list[Path], size: int, mode: str = RESIZE) -> np.ndarray:
    """uint8 array (N, 3, size, size) of the images at ``paths``, decoded by a few threads
    (PIL releases the GIL while decoding)."""
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    if not paths:
        return out
    workers = max(1, min(8, torch.get_num_threads(), len(paths)))

    def work(i):
        out[i] = _decode(paths[i], size, mode)

    if workers == 1:
        for i in range(len(paths)):
            work(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(len(paths))))
    return out


# --------------------------------------------------------------------------- cache


def _fingerprint(files: list[Path], base: Path, extra: str) -> str:
    h = hashlib.sha1(f"{_CACHE_FORMAT}\0{extra}\n".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(base).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_path(name: str, folder: Path, key: str) -> Path:
    from ddlib.data import cache_root

    where = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
    return cache_root() / f"{name}-{where}-{key}.safetensors"


def _load_cache(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in ("x_train", "y_train", "x_test", "y_test")}
    return t["x_train"], t["y_train"], t["x_test"], t["y_test"], tuple(json.loads(meta["class_names"])), 255.0


def _save_cache(path: Path, x_tr, y_tr, x_te, y_te, class_names, source: Path) -> None:
    """Write atomically; then drop older caches of the same source folder."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"x_train": torch.from_numpy(x_tr), "y_train": torch.as_tensor(y_tr, dtype=torch.int64),
               "x_test": torch.from_numpy(x_te), "y_test": torch.as_tensor(y_te, dtype=torch.int64)}
    meta = {"class_names": json.dumps(list(class_names)), "source": str(source), "format": _CACHE_FORMAT}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stem = path.name.rsplit("-", 1)[0]  # "<name>-<folder hash>"
    for old in path.parent.glob(f"{stem}-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)


def _cached_or_decoded(name: str, folder: Path, files: list[Path], extra: str, decode):
    path = cache_path(name, folder, _fingerprint(files, folder, extra))
    if path.is_file():
        try:
            return _load_cache(path)
        except Exception:  # truncated or foreign file: decode again and overwrite it
            pass
    x_tr, y_tr, x_te, y_te, class_names = decode()
    _save_cache(path, x_tr, y_tr, x_te, y_te, class_names, folder)
    return x_tr, y_tr, x_te, y_te, tuple(class_names), 255.0


# --------------------------------------------------------------------------- Tiny ImageNet


def _tiny_names(folder: Path, wnids: list[str]) -> tuple[str, ...]:
    """First synonym of each wnid from ``words.txt`` when present, else the wnid itself."""
    words = {}
    if (folder / "words.txt").is_file():
        for line in (folder / "words.txt").read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t", 1)
            if len(parts) == 2:
                words[parts[0].strip()] = parts[1].split(",")[0].strip()
    return tuple(words.get(w, w) for w in wnids)


def read_tinyimagenet(root: Path) -> tuple:
    """``<root>/tiny-imagenet-200`` as uint8 (N, 3, 64, 64) arrays; classes in sorted wnid order
    (``ImageFolder`` order, as MTT); the val split is returned as the test split."""
    name = "tinyimagenet"
    folder = root / TINY_FOLDER
    train, val = folder / "train", folder / "val"
    if not train.is_dir() or not val.is_dir():
        missing = " and ".join(str(p) for p in (train, val) if not p.is_dir())
        raise _not_found(name, folder, f"no folder {missing}", _TINY_LAYOUT)
    wnids = _class_folders(train)
    if not wnids:
        raise _not_found(name, folder, f"no class folders in {train}", _TINY_LAYOUT)
    index = {w: i for i, w in enumerate(wnids)}
    train_files = [(p, index[w]) for w in wnids for p in _images_in(train / w)]
    annotations = val / "val_annotations.txt"
    if annotations.is_file():
        test_files = []
        for line in annotations.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise _not_found(name, folder, f"{annotations} names class {parts[1]!r}, which has no folder in "
                                 f"{train}", _TINY_LAYOUT)
            test_files.append((val / "images" / parts[0], index[parts[1]]))
        absent = [str(p) for p, _ in test_files if not p.is_file()]
        if absent:
            raise _not_found(name, folder, f"{len(absent)} images listed in {annotations} are missing, e.g. "
                             f"{absent[0]}", _TINY_LAYOUT)
        listed = [annotations]
    elif (val / "images").is_dir() and _class_folders(val / "images"):
        sub = val / "images"
        unknown = sorted(set(_class_folders(sub)) - set(index))
        if unknown:
            raise _not_found(name, folder, f"{sub} has class folders without a train folder: {unknown[:3]}",
                             _TINY_LAYOUT)
        test_files = [(p, index[w]) for w in _class_folders(sub) for p in _images_in(sub / w)]
        listed = []
    else:
        raise _not_found(name, folder, f"no {annotations} (and no class folders in {val / 'images'})",
                         _TINY_LAYOUT)
    if not train_files or not test_files:
        raise _not_found(name, folder, f"no images found under {train if not train_files else val}",
                         _TINY_LAYOUT)

    def decode():
        x_tr = decode_images([p for p, _ in train_files], TINY_SIZE)
        x_te = decode_images([p for p, _ in test_files], TINY_SIZE)
        y_tr = np.array([c for _, c in train_files], dtype=np.int64)
        y_te = np.array([c for _, c in test_files], dtype=np.int64)
        return x_tr, y_tr, x_te, y_te, _tiny_names(folder, wnids)

    files = [p for p, _ in train_files] + [p for p, _ in test_files] + listed
    files += [folder / "words.txt"] if (folder / "words.txt").is_file() else []
    return _cached_or_decoded(name, folder, files, f"{name}\0{TINY_SIZE}\0{RESIZE}\0{','.join(wnids)}", decode)


# --------------------------------------------------------------------------- ImageNet subsets


def subset_wnids(name: str, train_folder: Path) -> list[str]:
    """The wnids of subset ``name`` in label order, resolved from the sorted class folders of
    ``train_folder`` (which must hold all 1000)."""
    folder = train_folder.parent
    if not train_folder.is_dir():
        raise _not_found(name, folder, f"no folder {train_folder}", _IMAGENET_LAYOUT)
    classes = _class_folders(train_folder)
    if len(classes) != IMAGENET_CLASSES:
        raise _not_found(
            name, folder,
            f"{train_folder} holds {len(classes)} class folders, not {IMAGENET_CLASSES}. MTT defines its subsets "
            f"by class positions in the sorted list of all {IMAGENET_CLASSES} ImageNet class folders, so all of "
            f"them must be present (those outside the subset may be empty)", _IMAGENET_LAYOUT)
    return [classes[i] for i in IMAGENET_SUBSETS[name][0]]


def read_imagenet_subset(name: str, root: Path) -> tuple:
    """MTT's ImageNet subset ``name`` from ``<root>/imagenet`` as uint8 (N, 3, 128, 128) arrays;
    train from ``train/``, test from ``val/``; labels 0..9 in MTT's order."""
    folder = root / IMAGENET_FOLDER
    train, val = folder / "train", folder / "val"
    wnids = subset_wnids(name, train)
    if not val.is_dir():
        raise _not_found(name, folder, f"no folder {val}", _IMAGENET_LAYOUT)
    split_files = {}
    for split, base in (("train", train), ("val", val)):
        pairs = []
        for label, w in enumerate(wnids):
            if not (base / w).is_dir():
                raise _not_found(name, folder, f"no class folder {base / w} (class {label} of {name})",
                                 _IMAGENET_LAYOUT)
            images = _images_in(base / w)
            if not images:
                raise _not_found(name, folder, f"no images in {base / w} (class {label} of {name})", _IMAGENET_LAYOUT)
            pairs += [(p, label) for p in images]
        split_files[split] = pairs
    class_names = IMAGENET_SUBSETS[name][1]

    def decode():
        out = []
        for split in ("train", "val"):
            pairs = split_files[split]
            out += [decode_images([p for p, _ in pairs], SUBSET_SIZE), np.array([c for _, c in pairs], dtype=np.int64)]
        return (*out, class_names)

    files = [p for s in ("train", "val") for p, _ in split_files[s]]
    return _cached_or_decoded(name, folder, files, f"{name}\0{SUBSET_SIZE}\0{RESIZE}\0{','.join(wnids)}", decode)


def read_folder_dataset(name: str, root: Path, download: bool = False) -> tuple:
    """Entry point for :func:`ddlib.data.load_dataset`: ``(x_tr, y_tr, x_te, y_te, class_names, 255.0)``."""
    try:
        if name == "tinyimagenet":
            return read_tinyimagenet(root)
        return read_imagenet_subset(name, root)
    except Exception as err:
        from ddlib.data import DatasetNotFoundError

        if download and isinstance(err, DatasetNotFoundError):
            raise DatasetNotFoundError(f"{err} (download=True has no effect for {name!r})") from err
        raise


def describe_layout(name: str, root: Path) -> str:
    """Where ``name`` is expected and in which layout (for documentation and error messages)."""
    if name == "tinyimagenet":
        return f"{root / TINY_FOLDER}: {_TINY_LAYOUT}"
    return f"{root / IMAGENET_FOLDER}: {_IMAGENET_LAYOUT}"
