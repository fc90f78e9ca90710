"""Image-folder datasets (Tiny ImageNet, MTT's ImageNet subsets) and CIFAR-100, on tiny folders the
tests write themselves: shapes, labels, class order, the decode cache, and the missing-folder errors."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import pytest
import torch

from ddlib import data, imagefolders
from ddlib.data import DatasetNotFoundError, load_dataset
from ddlib.imagefolders import IMAGENET_SUBSETS

from fake_data import tiny_wnids, write_cifar100, write_imagenet, write_tinyimagenet


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("PIL.Image.open was called: the cache was not used")

    monkeypatch.setattr(PIL.Image, "open", refuse)


def _pixels(ds, x):
    return torch.round(ds.denormalise(x) * 255).to(torch.uint8)


# --------------------------------------------------------------------------- registry


def test_names_and_registry():
    assert data.canonical_name("Tiny-ImageNet") == "tinyimagenet"
    assert data.canonical_name("tiny") == "tinyimagenet"
    assert data.canonical_name("ImageNette") == "imagenette"
    assert data.canonical_name("image_squawk") == "imagesquawk"
    assert set(imagefolders.FOLDER_DATASETS) == set(data._FOLDER_DATASETS) <= set(data.DATASETS)
    for name, (indices, names) in IMAGENET_SUBSETS.items():
        assert len(indices) == len(set(indices)) == len(names) == 10, name
        assert all(0 <= i < 1000 for i in indices)
    # MTT's lists (GeorgeCazenavette/mtt-distillation, utils.py): spot checks of order
    assert IMAGENET_SUBSETS["imagenette"][0][:3] == (0, 217, 482)
    assert IMAGENET_SUBSETS["imagewoof"][0][0] == 193 and IMAGENET_SUBSETS["imageyellow"][0][-1] == 11


# --------------------------------------------------------------------------- Tiny ImageNet


def test_tinyimagenet_shapes_labels_and_pixels(tmp_path):
    root = write_tinyimagenet(tmp_path / "data", num_classes=5, train_per_class=3, val_per_class=2)
    ds = load_dataset("tinyimagenet", root=root)
    assert ds.x_train.shape == (15, 3, 64, 64) and ds.x_test.shape == (10, 3, 64, 64)
    assert ds.info.input_shape == (3, 64, 64) and ds.info.num_classes == 5
    wnids = sorted(tiny_wnids(5))  # ImageFolder order, not the wnids.txt order
    assert ds.info.class_names == tuple(f"thing {tiny_wnids(5).index(w)}" for w in wnids)
    assert ds.y_train.tolist() == [c for c in range(5) for _ in range(3)]
    # val labels come from val_annotations.txt, in its order
    folder = root / "tiny-imagenet-200"
    lines = (folder / "val" / "val_annotations.txt").read_text().split("\n")
    assert ds.y_test.tolist() == [wnids.index(line.split("\t")[1]) for line in lines if line]
    # pixels: exactly the decoded JPEG, channels first; a greyscale file becomes 3 equal channels
    first = folder / "val" / "images" / "val_0.JPEG"
    expected = np.array(PIL.Image.open(first).convert("RGB")).transpose(2, 0, 1).copy()
    assert torch.equal(_pixels(ds, ds.x_test[0]), torch.from_numpy(expected))
    grey = _pixels(ds, ds.x_train[0])  # <wnid>_0.JPEG of the first class is greyscale
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(ds.x_train.mean().item()) < 1e-4  # normalised with the train split's statistics


def test_tinyimagenet_cache_is_used_and_refreshed(tmp_path, monkeypatch, private_cache):
    root = write_tinyimagenet(tmp_path / "data", num_classes=3)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    first = load_dataset("tiny-imagenet", root=root)
    cached = list(private_cache.glob("tinyimagenet-*.safetensors"))
    assert len(cached) == 1
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # data root untouched

    with monkeypatch.context() as m:
        _no_decoding(m)
        again = load_dataset("tinyimagenet", root=root)
    assert torch.equal(again.x_train, first.x_train) and torch.equal(again.y_test, first.y_test)
    assert again.info == first.info

    # a changed folder is decoded again, and the stale cache file is replaced
    extra = root / "tiny-imagenet-200" / "train" / sorted(tiny_wnids(3))[1] / "images" / "extra.JPEG"
    PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(extra, "JPEG")
    grown = load_dataset("tinyimagenet", root=root)
    assert len(grown.y_train) == len(first.y_train) + 1
    assert torch.bincount(grown.y_train).tolist() == [3, 4, 3]
    now = list(private_cache.glob("tinyimagenet-*.safetensors"))
    assert len(now) == 1 and now != cached


def test_tinyimagenet_val_sorted_into_class_folders(tmp_path):
    """The re-sorted val layout (val/images/<wnid>/*.JPEG) that MTT's ImageFolder call reads."""
    root = write_tinyimagenet(tmp_path / "data", num_classes=3, val_per_class=2)
    folder = root / "tiny-imagenet-200" / "val"
    for line in (folder / "val_annotations.txt").read_text().split("\n"):
        if line:
            name, wnid = line.split("\t")[:2]
            (folder / "images" / wnid).mkdir(exist_ok=True)
            os.replace(folder / "images" / name, folder / "images" / wnid / name)
    (folder / "val_annotations.txt").unlink()
    ds = load_dataset("tinyimagenet", root=root)
    assert ds.y_test.tolist() == [0, 0, 1, 1, 2, 2]


def test_tinyimagenet_missing_folder_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("tinyimagenet", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "tiny-imagenet-200") in msg and "val_annotations.txt" in msg and "DDLIB_DATA" in msg
    root = write_tinyimagenet(tmp_path / "data", num_classes=2)
    (root / "tiny-imagenet-200" / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DatasetNotFoundError, match="val_1.JPEG"):
        load_dataset("tinyimagenet", root=root)


# --------------------------------------------------------------------------- ImageNet subsets


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """One fake ImageNet (1000 wnid folders n%08d) with images for every class of every subset."""
    wanted = sorted({i for indices, _ in IMAGENET_SUBSETS.values() for i in indices})
    return write_imagenet(tmp_path_factory.mktemp("imagenet_data"), wanted, train_per_class=3, val_per_class=2)


@pytest.mark.parametrize("name", sorted(IMAGENET_SUBSETS))
def test_imagenet_subset_classes_in_mtt_order(imagenet_root, name):
    ds = load_dataset(name, root=imagenet_root)
    assert ds.x_train.shape == (30, 3, 128, 128) and ds.x_test.shape == (20, 3, 128, 128)
    assert ds.info.num_classes == 10 and ds.info.class_names == IMAGENET_SUBSETS[name][1]
    assert ds.y_train.tolist() == [c for c in range(10) for _ in range(3)]
    assert ds.y_test.tolist() == [c for c in range(10) for _ in range(2)]
    # label c holds the images of the c-th index of MTT's list (sorted-folder position = index here)
    indices = IMAGENET_SUBSETS[name][0]
    for c in (0, 7):
        path = imagenet_root / "imagenet" / "val" / f"n{indices[c]:08d}" / f"n{indices[c]:08d}_1.JPEG"
        with PIL.Image.open(path) as img:
            expected = np.array(imagefolders.fit_square(img.convert("RGB"), 128)).transpose(2, 0, 1).copy()
        assert torch.equal(_pixels(ds, ds.x_test[2 * c + 1]), torch.from_numpy(expected))
    assert imagefolders.subset_wnids(name, imagenet_root / "imagenet" / "train") == [f"n{i:08d}" for i in indices]


def test_imagenet_subset_cache(imagenet_root, monkeypatch, private_cache):
    first = load_dataset("imagemeow", root=imagenet_root)
    assert len(list(private_cache.glob("imagemeow-*.safetensors"))) == 1
    _no_decoding(monkeypatch)
    again = load_dataset("imagemeow", root=imagenet_root)
    assert torch.equal(again.x_test, first.x_test) and again.info == first.info


def test_fit_square_matches_torchvision():
    """'crop' is torchvision's Resize(128) + CenterCrop(128) on a PIL image; 'squash' is MTT's
    Resize((128, 128))."""
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for h, w in [(150, 200), (333, 129), (128, 128), (97, 160)]:
        img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = np.asarray(imagefolders.fit_square(img, 128))
        theirs = np.asarray(transforms.CenterCrop(128)(transforms.Resize(128)(img)))
        assert ours.shape == (128, 128, 3) and np.array_equal(ours, theirs), (h, w)
        squash = np.asarray(imagefolders.fit_square(img, 128, "squash"))
        assert np.array_equal(squash, np.asarray(transforms.Resize((128, 128))(img)))


def test_imagenet_subset_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("imagenette", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "imagenet") in msg and "train/<wnid>/*.JPEG" in msg and "val/<wnid>" in msg
    # not all 1000 class folders: the indices cannot be resolved
    partial = write_imagenet(tmp_path / "partial", IMAGENET_SUBSETS["imagenette"][0], train_per_class=1,
                             val_per_class=1, num_classes=999)
    with pytest.raises(DatasetNotFoundError, match="holds 999 class folders, not 1000"):
        load_dataset("imagenette", root=partial)
    # a class of the subset with no validation folder
    full = write_imagenet(tmp_path / "full", IMAGENET_SUBSETS["imagewoof"][0], train_per_class=1, val_per_class=1)
    (full / "imagenet" / "val" / "n00000193" / "n00000193_0.JPEG").unlink()
    (full / "imagenet" / "val" / "n00000193").rmdir()
    with pytest.raises(DatasetNotFoundError, match=r"n00000193 \(class 0 of imagewoof\)"):
        load_dataset("imagewoof", root=full)


# --------------------------------------------------------------------------- CIFAR-100


def test_cifar100_fine_labels(tmp_path):
    root = write_cifar100(tmp_path, train=200, test=100)
    ds = load_dataset("cifar-100", root=root)
    assert ds.x_train.shape == (200, 3, 32, 32) and ds.x_test.shape == (100, 3, 32, 32)
    assert ds.info.num_classes == 100 and ds.info.class_names[:2] == ("fine00", "fine01")
    assert ds.y_train.tolist() == [i % 100 for i in range(200)]  # fine, not coarse, labels
    assert ds.y_test.max().item() == 99
