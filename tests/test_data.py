"""data.py: the real readers on tiny data sets in the real formats, scikit-learn's digits, and an
unreadable image named in one `error:` line wherever it is read: in the main process and in loader
workers, in both training scripts and in linear_eval.py."""

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import common
import data as D
import linear_eval as L
import train_byol as B
import train_simsiam as S
from tiny_data import write_cifar10, write_fashionmnist, write_imagefolder, write_tinyimagenet


def test_load_dataset_real_readers(tmp_path):
    write_cifar10(tmp_path, n_train_per_class=2, n_test_per_class=1)
    train = D.load_dataset("cifar10", tmp_path, "train")
    test = D.load_dataset("cifar10", tmp_path, "test")
    assert len(train) == 20 and len(test) == 10 and len(train.classes) == 10
    img, label = train[0]
    assert img.size == (32, 32) and 0 <= label < 10
    write_imagefolder(tmp_path / "folder", n_classes=3, n_train_per_class=2, n_val_per_class=1)
    assert len(D.load_dataset("imagefolder", tmp_path / "folder", "test")) == 3


def test_missing_data_says_where_and_what_to_do(tmp_path):
    with pytest.raises(D.DataError, match=r"cifar-10-batches-py.*--download"):
        D.load_dataset("cifar10", tmp_path, "train")
    with pytest.raises(D.DataError, match=r"train/ with one folder per class"):
        D.load_dataset("imagefolder", tmp_path, "train")
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(D.DataError, match="could not be loaded"):
        D.load_dataset("cifar10", tmp_path, "train")


def test_tinyimagenet_is_held_in_memory_from_its_archive_layout_and_cached_once(tmp_path):
    """The extracted archive under --data-dir (or its tiny-imagenet-200 folder), decoded once into uint8 arrays
    like CIFAR's, so the device views serve it; the labels are ImageFolder's; a later run reads the cache."""
    with pytest.raises(D.DataError, match=r"tinyimagenet not found.*curl -LO http://cs231n.*tiny-imagenet-200.zip"):
        D.fetch("tinyimagenet", tmp_path)
    from PIL import Image
    write_tinyimagenet(tmp_path, n_classes=3, n_train_per_class=2, n_val_per_class=2)
    top = tmp_path / "tiny-imagenet-200"
    D.fetch("tinyimagenet", tmp_path)  # the data step decodes both splits
    assert sorted(p.name for p in top.glob("*.npz")) == ["train-uint8.npz", "val-uint8.npz"]
    folder = D.load_dataset("imagefolder", top, "pretrain")  # the same images read as files
    for root in (tmp_path, top):
        train, test = D.load_dataset("tinyimagenet", root, "pretrain"), D.load_dataset("tinyimagenet", root, "test")
        assert train.classes == folder.classes and train.targets == folder.targets and len(test) == 6
        assert train.data.shape == (6, 64, 64, 3) and train.data.dtype == np.uint8
        assert all((np.asarray(img) == np.asarray(Image.open(path).convert("RGB"))).all()
                   for (img, _), (path, _) in zip(train, folder.samples))
        lines = (top / "val" / "val_annotations.txt").read_text().split()
        assert test.targets[0] == train.classes.index(lines[1])  # val_0's class, from the annotation file
        x, y = D.images_as_tensor(train)
        assert x.shape == (6, 3, 64, 64) and y.tolist() == train.targets
    for image in top.glob("train/*/images/*.JPEG"):
        image.unlink()
    assert len(D.load_dataset("tinyimagenet", tmp_path, "train")) == 6  # from the cache


def test_fashionmnist_reads_the_idx_files_in_every_layout_and_names_what_is_wrong(tmp_path, monkeypatch):
    """The four IDX files, gzipped (Debian's package) or not (torchvision's download), flat or in
    torchvision's FashionMNIST/raw; missing or corrupt files give one line that says what to do."""
    monkeypatch.setattr(D.FashionMNIST, "DEBIAN", tmp_path / "not-installed")
    with pytest.raises(D.DataError, match=r"fashionmnist not found.*--download.*apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashionmnist", tmp_path, "train")
    write_fashionmnist(tmp_path / "flat", n_train_per_class=3, n_test_per_class=1, gz=True)
    write_fashionmnist(tmp_path / "tv" / "FashionMNIST" / "raw", n_train_per_class=3, n_test_per_class=1, gz=False)
    for root in (tmp_path / "flat", tmp_path / "tv"):
        train, test = D.load_dataset("fashionmnist", root, "pretrain"), D.load_dataset("fashionmnist", root, "test")
        assert (len(train), len(test), len(train.classes)) == (30, 10, 10)
        assert train.data.shape == (30, 28, 28, 3) and train.data.dtype == np.uint8
        assert (train.data[..., 0] == train.data[..., 2]).all()  # grayscale, held as RGB
        img, label = train[0]
        assert img.size == (28, 28) and train.targets == sorted(train.targets) and label == 0
        x, y = D.images_as_tensor(train)
        assert x.shape == (30, 3, 28, 28) and y.tolist() == train.targets
    monkeypatch.setattr(D.FashionMNIST, "DEBIAN", tmp_path / "flat")  # where the package puts them
    assert len(D.load_dataset("fashionmnist", tmp_path / "elsewhere", "train")) == 30
    bad = tmp_path / "flat" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(D.DataError, match="t10k-images-idx3-ubyte.gz: cannot be read as an IDX file"):
        D.load_dataset("fashionmnist", tmp_path / "flat", "test")


def test_digits_are_a_fixed_stratified_split_of_real_scans():
    train, test = D.load_dataset("digits", "unused", "pretrain"), D.load_dataset("digits", "unused", "test")
    assert (len(train), len(test)) == (1300, 497) and len(train.classes) == 10
    assert train.data.shape == (1300, 32, 32, 3) and train.data.dtype == np.uint8
    assert (train.data[..., 0] == train.data[..., 2]).all() and train.data.max() == 255 and train.data.min() == 0
    counts = np.bincount(test.targets, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 51  # stratified: about 497 / 10 per class
    np.testing.assert_array_equal(np.bincount(train.targets) + counts, np.bincount(load_digits().target))
    again = D.load_dataset("digits", "unused", "train")
    assert np.array_equal(again.data, train.data) and again.targets == train.targets  # fixed, and 'train' == 'pretrain'
    image, label = test[0]
    assert image.size == (32, 32) and label == test.targets[0]
    x, y = D.images_as_tensor(train)  # the device augmentation path takes it like CIFAR
    assert x.shape == (1300, 3, 32, 32) and torch.equal(y, torch.tensor(train.targets))


def test_fashionmnist_trains_on_the_device_views_and_evaluates(tmp_path):
    root = write_fashionmnist(tmp_path / "fmnist", n_train_per_class=4, n_test_per_class=2)
    out = tmp_path / "run"
    S.main(["isoloss", "--dataset", "fashionmnist", "--data-dir", str(root), "--out-dir", str(out), "--width", "0.0625",
            "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "2",
            "--warmup-epochs", "0", "--num-workers", "0", "--augment-on", "device", "--crop", "16"])
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["step"] == 2 and 0 <= record["knn_top1"] <= 100
    assert json.loads((out / "backbone.json").read_text())["small_stem"]
    result = L.main(L.Args(checkpoint=str(out / "backbone.pt"), dataset="fashionmnist", data_dir=str(root),
                           num_workers=0, crop=16, out_dir=str(tmp_path / "eval")))
    assert 0 <= result["offline_linear"]["top1"] <= 100


@pytest.fixture
def broken_folder(tmp_path):
    """An image folder whose train/ holds one truncated PNG (half its bytes), 16 train images in all."""
    folder = write_imagefolder(tmp_path / "folder", n_classes=4, n_train_per_class=4, n_val_per_class=2, size=32)
    bad = sorted((folder / "train" / "class2").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    return folder, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_image_is_a_data_error_naming_the_file_in_any_process(broken_folder, workers):
    folder, bad = broken_folder
    base = D.load_dataset("imagefolder", folder, "pretrain")
    views = D.TwoViews(base, tuple(map(D.pil_view, D.view_specs(16, (0.0, 0.0)))), seed=0)
    loader = D.loader(views, workers, False, batch_sampler=D.EpochBatches(len(base), 16, 1, seed=0))
    with pytest.raises(D.DataError) as e:
        list(loader)
    assert str(e.value) == f"{bad}: cannot be read as an image ({str(e.value).split('(', 1)[1]}"
    assert len(str(e.value).splitlines()) == 1 and "replace or delete the file" in str(e.value)


def one_error_line(capsys, run) -> str:
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("script", [B, S], ids=["train_byol", "train_simsiam"])
@pytest.mark.parametrize("workers", [0, 2])
def test_training_stops_with_one_line_naming_a_truncated_image(broken_folder, tmp_path, capsys, script, workers,
                                                               no_onednn):
    folder, bad = broken_folder
    argv = ["--dataset", "imagefolder", "--data-dir", str(folder), "--out-dir", str(tmp_path / "run"), "--crop", "16",
            "--batch-size", "16", "--epochs", "1", "--width", "0.0625", "--proj-hidden", "16", "--proj-dim", "8",
            "--pred-hidden", "16", "--num-workers", str(workers), "--knn-k", "0"]
    assert str(bad) in one_error_line(capsys, lambda: script.main(argv))
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_linear_eval_stops_with_one_line_naming_a_truncated_image(broken_folder, tmp_path, capsys, workers):
    folder, bad = broken_folder
    torch.save(common.resnet18(0.0625).state_dict(), tmp_path / "backbone.pt")
    args = L.Args(checkpoint=str(tmp_path / "backbone.pt"), dataset="imagefolder", data_dir=str(folder), crop=16,
                  num_workers=workers)
    assert str(bad) in one_error_line(capsys, lambda: L.main(args))


@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_a_data_set_added_as_the_readme_says_trains_on_both_view_paths(tmp_path, monkeypatch, augment_on, no_onednn):
    """The README's contract: a load_dataset branch returning an InMemory subclass (uint8 N x H x W x 3 `data`,
    `targets`, `classes`) and its size in CROP_SIZE is all a training script needs, on either view path."""
    import dataclasses

    class Squares(D.InMemory):
        classes = ["dark", "bright"]

        def __init__(self, split, transform=None):
            rng = np.random.default_rng(split == "test")
            self.targets = [i % 2 for i in range(24)]
            self.data = np.stack([np.full((24, 24, 3), 60 + 120 * y, np.uint8) + rng.integers(0, 30, (24, 24, 3),
                                                                                          dtype=np.uint8)
                                  for y in self.targets])
            self.transform = transform

    real = D.load_dataset
    monkeypatch.setattr(D, "load_dataset", lambda name, *a, **k: Squares(a[1], *a[2:3]) if name == "squares"
                        else real(name, *a, **k))
    monkeypatch.setitem(D.CROP_SIZE, "squares", 24)
    args = dataclasses.replace(B.PRESETS["byol"][1], dataset="squares", out_dir=str(tmp_path / "run"), crop=16,
                               width=0.0625, proj_hidden=32, proj_dim=16, pred_hidden=32, batch_size=8, num_workers=0,
                               epochs=1, steps_per_epoch=2, warmup_epochs=0, knn_k=5, augment_on=augment_on)
    B.train(args)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["knn_top1"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment_on"] == augment_on
