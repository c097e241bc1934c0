"""Tiny data sets in the real on-disk formats, written by the tests themselves.

Each class is a fixed random colour pattern plus noise, so the classes are linearly separable in
pixel space (a useful backbone keeps them apart; a constant one cannot).
"""

import pickle
from pathlib import Path

import numpy as np


def class_images(n_per_class: int, n_classes: int, size: int, seed: int = 0):
    """uint8 images (N, size, size, 3) and integer labels (N,)."""
    # The class patterns are the same for every split; only the noise depends on the seed.
    patterns = np.random.default_rng(1234).uniform(40, 215, size=(n_classes, 4, 4, 3))
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(n_classes):
        base = np.kron(patterns[c], np.ones((size // 4, size // 4, 1)))  # blocky, survives crops
        noise = rng.normal(0, 20, size=(n_per_class, size, size, 3))
        images.append(np.clip(base[None] + noise, 0, 255).astype(np.uint8))
        labels += [c] * n_per_class
    return np.concatenate(images), np.array(labels)


def write_cifar10(root, n_train_per_class=8, n_test_per_class=4, n_classes=10, seed=0) -> Path:
    """root/cifar-10-batches-py in CIFAR-10's python format (5 train batches, test_batch, batches.meta)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    x, y = class_images(n_train_per_class, n_classes, 32, seed)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    for i, idx in enumerate(np.array_split(np.arange(len(y)), 5)):
        _dump(folder / f"data_batch_{i + 1}", x[idx], y[idx])
    xt, yt = class_images(n_test_per_class, n_classes, 32, seed + 1)
    _dump(folder / "test_batch", xt, yt)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(n_classes)]}, f)
    return Path(root)


def _dump(path, x, y):
    # CIFAR stores each image as 3072 bytes: the red plane, then green, then blue.
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    with open(path, "wb") as f:
        pickle.dump({"data": data, "labels": [int(v) for v in y]}, f)


def write_imagefolder(root, n_classes=4, n_train_per_class=8, n_val_per_class=4, size=32, seed=0) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png."""
    from PIL import Image
    root = Path(root)
    for split, n, s in (("train", n_train_per_class, seed), ("val", n_val_per_class, seed + 1)):
        x, y = class_images(n, n_classes, size, s)
        for i, (img, c) in enumerate(zip(x, y)):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def write_fashionmnist(root, n_train_per_class=4, n_test_per_class=2, gz=True, seed=0) -> Path:
    """root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]: Fashion-MNIST's IDX format, 28 x 28 grayscale."""
    import gzip
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train_per_class, seed), ("t10k", n_test_per_class, seed + 1)):
        x, y = class_images(n, 10, 28, s)
        for kind, arr in (("images-idx3", x.mean(-1).astype(np.uint8)), ("labels-idx1", y.astype(np.uint8))):
            header = (0x0800 + arr.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
            raw = header + arr.tobytes()
            name = root / f"{prefix}-{kind}-ubyte"
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(raw))
            else:
                name.write_bytes(raw)
    return root


def write_tinyimagenet(root, n_classes=3, n_train_per_class=2, n_val_per_class=1, size=64, seed=0) -> Path:
    """root/tiny-imagenet-200 as its archive extracts: train/<wnid>/images/<wnid>_<i>.JPEG, and val/images/*.JPEG
    with val_annotations.txt (file, wnid, box) giving the classes."""
    from PIL import Image
    top = Path(root) / "tiny-imagenet-200"
    wnids = [f"n{1000 + c:08d}" for c in range(n_classes)]
    x, y = class_images(n_train_per_class, n_classes, size, seed)
    for i, (img, c) in enumerate(zip(x, y)):
        d = top / "train" / wnids[c] / "images"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{wnids[c]}_{i}.JPEG")
    (top / "val" / "images").mkdir(parents=True)
    x, y = class_images(n_val_per_class, n_classes, size, seed + 1)
    lines = []
    for i, (img, c) in enumerate(zip(x[::-1], y[::-1])):  # val/ is not in class order
        Image.fromarray(img).save(top / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t{size - 1}\t{size - 1}")
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return Path(root)
