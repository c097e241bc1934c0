"""The data of train_byol.py, train_simsiam.py and linear_eval.py:

  load_dataset, eval_transform    cifar10, cifar100, stl10, tinyimagenet, imagefolder, digits, fashionmnist;
                                  the test view
  fetch                           the data step before runs: download (or say how to get) a data set, once
  ViewSpec, view_specs, pil_view  one view's augmentation (METHOD.md section 6), on PIL images in loader workers
  batched_view, device_views      the same distributions, drawn per image on a uint8 batch on the device
  TwoViews, EpochBatches          augmentations and batch order that are functions of (seed, epoch, index)

Every failure to find or read data is a DataError whose one-line message names the file or folder
and what to do, in the main process and in data-loader workers alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.datasets as D
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

# Default crop size of each data set (its native resolution; imagefolder is resized to it).
CROP_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "tinyimagenet": 64, "imagefolder": 64, "digits": 32,
             "fashionmnist": 28}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """A data set that is missing or unreadable; the message says where we looked and what to do."""

    def __init__(self, message: str):
        # From a loader worker it comes back with the worker's traceback as its message, our line last.
        if message.startswith("Caught DataError"):
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


# --- Data sets --------------------------------------------------------------------------------


def eval_transform(dataset: str, crop: int):
    """Test-time view: at a data set's own image size as it is, else (imagefolder, another crop) resized and
    centre-cropped."""
    same = crop == CROP_SIZE.get(dataset) and dataset != "imagefolder"
    resize = [] if same else [T.Resize(round(crop * 8 / 7)), T.CenterCrop(crop)]
    return T.Compose(resize + [T.ToTensor(), T.Normalize(MEAN, STD)])


def read_image(path: str):
    """torchvision's default image loader, with the file named when it is truncated or corrupt."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise DataError(f"{path}: cannot be read as an image ({e}); replace or delete the file") from None


def _present(cls):
    # torchvision checks MD5 sums of the official files; with md5 None the files need only exist, so
    # that copies in the same format (the tests write tiny ones) load through the same reader. A
    # download is still checked, and a corrupt file still fails while it is read, with a DataError.
    attrs = {k: [[f, None] for f, *_ in getattr(cls, k)] for k in ("train_list", "test_list")}
    if hasattr(cls, "meta"):
        attrs["meta"] = {**cls.meta, "md5": None}
    return type(cls.__name__, (cls,), attrs)


_OFFICIAL = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"),
    "stl10": ("stl10_binary", "stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/"),
}


def load_dataset(name: str, root: str | Path, split: str, transform=None, download: bool = False):
    """(image, label) pairs. split: 'pretrain' (STL-10: train+unlabeled, label -1 if unlabeled),
    'train' (labelled), 'test' (imagefolder/tinyimagenet: val). cifar10/cifar100/stl10: torchvision's
    readers under root; tinyimagenet: the extracted tiny-imagenet-200 (val/ through val_annotations.txt,
    or as class folders); imagefolder: root/train/<class>/*, root/val/<class>/*; digits: no root;
    fashionmnist: the four IDX files (see FashionMNIST)."""
    if split not in ("pretrain", "train", "test"):
        raise ValueError(f"unknown split {split!r}")
    root = Path(root)
    if name == "digits":  # ships with scikit-learn: nothing to download
        return Digits(split, transform)
    if name == "fashionmnist":
        return FashionMNIST(root, split, transform, download)
    if name in _OFFICIAL:
        folder, archive = _OFFICIAL[name]
        if not download and not (root / folder).is_dir():
            raise DataError(f"{name} not found: expected {root / folder}/. Pass --download (needs internet) or "
                            f"extract {archive} into {root}/")
        try:
            if name == "stl10":
                stl_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
                return _present(D.STL10)(str(root), split=stl_split, transform=transform, download=download)
            cls = _present(D.CIFAR10 if name == "cifar10" else D.CIFAR100)
            return cls(str(root), train=split != "test", transform=transform, download=download)
        except Exception as e:  # download failures, missing or unreadable files
            raise DataError(f"{name} under {root} could not be loaded ({type(e).__name__}: {e}). Without internet, "
                            f"extract {archive} into {root}/ by hand") from e
    if name in ("tinyimagenet", "imagefolder"):
        hint = (f"get it with `{TINY_IMAGENET_STEP.format(root=root)}` and pass --data-dir {root}"
                if name == "tinyimagenet"
                else "make DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg and pass DIR as --data-dir")
        if name == "tinyimagenet" and not (root / "train").is_dir() and (root / "tiny-imagenet-200").is_dir():
            root = root / "tiny-imagenet-200"  # so that --data-dir data serves every data set of a grid
        sub = root / ("val" if split == "test" else "train")
        if download and not sub.is_dir():
            raise DataError(f"{name} cannot be downloaded by this repository: {hint}")
        if not sub.is_dir():
            where = f"{sub}/" if name == "imagefolder" else f"{sub}/ (nor in {sub.parent / 'tiny-imagenet-200'}/)"
            raise DataError(f"{name} not found: expected {where} with one folder per class; {hint}")
        try:
            if name == "tinyimagenet":
                return TinyImageNet(root, split, transform)
            return D.ImageFolder(str(sub), transform, loader=read_image)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{name} under {sub} could not be read ({e}); {hint} as --data-dir") from e
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(CROP_SIZE)}")


class InMemory(torch.utils.data.Dataset):
    """Images held as one uint8 array `data` (N, H, W, 3) with `targets`, like torchvision's CIFAR: the
    device augmentation path (images_as_tensor) takes the array as it is."""

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        image = Image.fromarray(self.data[i])
        return (image if self.transform is None else self.transform(image)), self.targets[i]


TINY_IMAGENET_STEP = ("curl -LO http://cs231n.stanford.edu/tiny-imagenet-200.zip && "
                      "unzip -q tiny-imagenet-200.zip -d {root}")


def fetch(name: str, root: str | Path) -> None:
    """The data step, once before any run: CIFAR-10/100, STL-10 and Fashion-MNIST downloaded into root through
    torchvision when missing; TinyImageNet (not downloadable here) decoded into its in-memory cache when it is
    extracted, else a DataError with its address and the command that puts it where --data-dir expects it;
    digits ships with scikit-learn; an imagefolder is the user's own."""
    if name == "imagefolder":
        return
    for split in ("pretrain", "test"):
        load_dataset(name, root, split, download=name != "tinyimagenet")


class TinyImageNet(InMemory):
    """TinyImageNet-200, held in memory as uint8 like CIFAR (100,000 train images of 64 x 64 x 3: 1.2 GB), so that
    the views can be drawn on the device. Decoded once from the extracted JPEGs (train/<class>/images/*, or any
    class-folder tree; val/ through val_annotations.txt where it has one) and cached beside them as SPLIT-uint8.npz,
    which later runs read in seconds. The labels follow the sorted class folders of train/, as ImageFolder's do."""

    def __init__(self, root: Path, split: str, transform=None):
        sub = "val" if split == "test" else "train"
        self.classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        cache = root / f"{sub}-uint8.npz"
        if not cache.is_file():
            if sub == "val" and (root / "val" / "val_annotations.txt").is_file():
                index = {c: i for i, c in enumerate(self.classes)}
                lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
                rows = (line.split("\t") for line in lines if line)
                samples = [(root / "val" / "images" / f, index[c]) for f, c, *_ in rows]
            else:
                samples = D.ImageFolder(str(root / sub), loader=read_image).samples
            images = np.stack([np.asarray(read_image(str(path))) for path, _ in samples])
            if images.ndim != 4:
                raise DataError(f"{root / sub}: the images are not all of one size; use --dataset imagefolder")
            # Written under a temporary name, then renamed: runs starting together never read a half-written cache.
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.npz")
            np.savez(tmp, data=images, targets=np.array([y for _, y in samples], dtype=np.int64))
            os.replace(tmp, cache)
        with np.load(cache) as saved:
            self.data, self.targets = saved["data"], saved["targets"].tolist()
        self.transform = transform


class Digits(InMemory):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 scans (no download), upsampled
    (bilinear) to 32x32 RGB, in a fixed stratified split: 1,300 train ('pretrain' and 'train') and 497 test."""

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str, transform=None):
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError:
            raise DataError("--dataset digits needs scikit-learn: pip install scikit-learn") from None
        d = load_digits()
        train, test = train_test_split(np.arange(len(d.target)), test_size=497, stratify=d.target, random_state=0)
        index = np.sort(test if split == "test" else train)
        x = torch.from_numpy(d.images[index]).float()[:, None] * (255 / 16)
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
        self.data = x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
        self.targets, self.transform = d.target[index].tolist(), transform


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format: magic 0x0000080N, N big-endian sizes, the bytes), gzipped
    or not."""
    import gzip
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        magic, nd = int.from_bytes(raw[:4], "big"), raw[3]
        shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
        if magic >> 8 != 0x08 or not 1 <= nd <= 3 or len(raw) != 4 + 4 * nd + math.prod(shape):
            raise ValueError(f"not an IDX file of bytes of the size its header gives ({len(raw)} bytes)")
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as an IDX file ({e}); replace it with the official file") from None
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(shape)


class FashionMNIST(InMemory):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train ('pretrain' and 'train') and 10,000 test 28x28 grayscale
    images of garments in 10 classes, from the official IDX files (gzipped or not), held as RGB. Looked for in
    ROOT, ROOT/FashionMNIST/raw (torchvision's download layout) and /usr/share/datasets/fashion-mnist (Debian's
    package dataset-fashion-mnist); --download fetches them with torchvision."""

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    DEBIAN = Path("/usr/share/datasets/fashion-mnist")

    def __init__(self, root: Path, split: str, transform=None, download: bool = False):
        prefix = "t10k" if split == "test" else "train"
        folders = [root, root / "FashionMNIST" / "raw", self.DEBIAN]

        def find(kind: str) -> Path | None:
            names = (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte{ext}" for ext in ("", ".gz"))
            return next((f / n for n in names for f in folders if (f / n).is_file()), None)
        if find("images") is None and download:
            try:
                D.FashionMNIST(str(root), train=split != "test", download=True)
            except Exception as e:
                raise DataError(f"fashionmnist could not be downloaded into {root} ({type(e).__name__}: {e})") from e
        images, labels = find("images"), find("labels")
        if images is None or labels is None:
            raise DataError(f"fashionmnist not found: no {prefix}-images-idx3-ubyte(.gz) and "
                            f"{prefix}-labels-idx1-ubyte(.gz) in {', '.join(map(str, folders))}. "
                            "Pass --download (needs internet), or on Debian/Ubuntu: "
                            "apt-get install dataset-fashion-mnist")
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.shape != (len(x),):
            raise DataError(f"{images}, {labels}: {x.shape} images with {y.shape} labels; "
                            "replace them with the official files")
        self.data = np.ascontiguousarray(np.repeat(x[..., None], 3, axis=-1))
        self.targets, self.transform = y.astype(np.int64).tolist(), transform


# --- Two asymmetric views per image, drawn from (seed, epoch, index) only ----------------------


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation (METHOD.md 6), shared by the PIL path and the batched device path."""

    crop: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0

    @property
    def blur_kernel(self) -> int:  # about a tenth of the image, odd, as in BYOL
        return 2 * (self.crop // 20) + 1


# Data sets of grayscale images, held as RGB: saturation, hue and grayscale conversion do nothing to them.
GRAYSCALE = {"digits", "fashionmnist"}


def view_specs(crop: int, blur: tuple[float, float], min_scale: float = 0.08,
               grayscale: bool = False) -> tuple[ViewSpec, ViewSpec]:
    """METHOD.md 6: crop, flip, colour jitter (p 0.8), grayscale (p 0.2), blur; view 2 adds solarisation (p 0.2).
    grayscale: only the jitter's brightness and contrast, which are all of it that acts on a gray image."""
    colour = dict(jitter=(0.4, 0.4, 0.0, 0.0), gray_p=0.0) if grayscale else {}
    return (ViewSpec(crop, (min_scale, 1.0), blur_p=blur[0], **colour),
            ViewSpec(crop, (min_scale, 1.0), blur_p=blur[1], solarize_p=0.2, **colour))


def pil_view(spec: ViewSpec, normalize: bool = True):
    """The view as torchvision transforms on a PIL image (the data-loader path)."""
    steps = [T.RandomResizedCrop(spec.crop, scale=spec.scale, ratio=spec.ratio),
             T.RandomHorizontalFlip(spec.flip_p),
             T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p),
             T.RandomGrayscale(spec.gray_p)]
    if spec.blur_p > 0:
        steps.append(T.RandomApply([T.GaussianBlur(spec.blur_kernel, sigma=(0.1, 2.0))], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=spec.solarize_p))
    return T.Compose(steps + [T.ToTensor()] + ([T.Normalize(MEAN, STD)] if normalize else []))


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 4_294_967_311 + index) % 2**63


class TwoViews(torch.utils.data.Dataset):
    """Indexed by (epoch, index): two augmented views and the label of image `index`, each image with
    its own draws from a generator seeded by (seed, epoch, index): the same views whichever worker
    loads it and whether or not the run was resumed, which makes resuming exact."""

    def __init__(self, base, views, seed: int):
        self.base, self.views, self.seed = base, views, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.base[index]
        # torchvision's transforms draw from torch's global CPU generator; fork it so the draws
        # here are a function of the key alone and nothing outside is disturbed.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(item_seed(self.seed, epoch, index))
            return self.views[0](image), self.views[1](image), label


class EpochBatches:
    """Batch sampler: epoch e's order is a permutation seeded by (seed, e), cut into global batches,
    each rank taking its slice. set_epoch(e, start) before each pass (a resumed run starts at batch
    `start`); a persistent DataLoader iterates the same sampler again, so its workers live across
    epochs. Incomplete batches are dropped (BatchNorm statistics of a tiny last batch are noise)."""

    def __init__(self, n: int, batch: int, steps: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.steps, self.seed, self.rank, self.world = n, batch, steps, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        per_rank = self.batch // self.world
        for s in range(self.start, self.steps):
            lo = s * self.batch + self.rank * per_rank
            yield [(self.epoch, i) for i in order[lo: lo + per_rank].tolist()]


def loader(dataset, num_workers: int, cuda: bool, persistent: bool = False, **kw):
    """A DataLoader; with `persistent` its workers (if any) live across epochs (rundir.finish stops them).
    Its own generator keeps it from drawing its worker base seed from the global one; no augmentation
    depends on that seed (see TwoViews)."""
    return torch.utils.data.DataLoader(dataset, num_workers=num_workers, pin_memory=cuda,
                                       persistent_workers=persistent and num_workers > 0,
                                       generator=torch.Generator().manual_seed(0), **kw)


# ---------------------------------------------------------------------------------------------
# Batched augmentation on the device (--augment-on device): a GPU training at ~20,000 images/s
# would need ~10-20 PIL loader processes (bench.py). The same per-image distributions as
# torchvision's transforms, applied to a whole uint8 batch. Small departures: bilinear resampling
# without antialiasing (crops are upsampled on the native-size data sets this path serves),
# contrast and hue in floating point, other random numbers (tests/test_augment.py compares).
# ---------------------------------------------------------------------------------------------


def _uniform(n, lo, hi, gen, device):
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _crop_boxes(n, H, W, spec, gen, device):
    """torchvision's RandomResizedCrop.get_params for n images at once: (top, left, h, w)."""
    area = torch.full((n, 10), float(H * W), device=device)
    target = area * _uniform((n, 10), *spec.scale, gen, device)
    aspect = torch.exp(_uniform((n, 10), math.log(spec.ratio[0]), math.log(spec.ratio[1]), gen, device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.float().argmax(1)  # the first of ten attempts that fits, as torchvision does
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    # No attempt fits (rare): torchvision falls back to the whole image for ratios in range.
    none = ~ok.any(1)
    w, h = torch.where(none, float(W), w), torch.where(none, float(H), h)
    top = torch.floor(torch.rand(n, generator=gen, device=device) * (H - h + 1))
    left = torch.floor(torch.rand(n, generator=gen, device=device) * (W - w + 1))
    top, left = torch.where(none, (H - h) // 2, top), torch.where(none, (W - w) // 2, left)
    return top, left, h, w


def _gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _shift_hue(x, shift):
    """Rotate each image's hue by shift[i] (a fraction of the circle) through RGB -> HSV -> RGB."""
    r, g, b = x.unbind(1)
    v, minc = x.max(1).values, x.min(1).values  # value = max
    delta = v - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(delta > 0, (h / 6) % 1, torch.zeros_like(h))
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    # HSV -> RGB in closed form, all three channels at once: c = v - v s clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6 h) mod 6 and n = 5, 3, 1 for red, green, blue.
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device)[:, None, None]
         + 6 * (h + shift[:, None, None]).unsqueeze(1)) % 6
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def _jitter(x, spec, gen):
    """torchvision's ColorJitter per image: four factors, applied in a random order, with p jitter_p."""
    n, device = x.shape[0], x.device
    b, c, s, h = spec.jitter
    factors = [_uniform(n, 1 - b, 1 + b, gen, device), _uniform(n, 1 - c, 1 + c, gen, device),
               _uniform(n, 1 - s, 1 + s, gen, device), _uniform(n, -h, h, gen, device)]
    order = torch.argsort(torch.rand(n, 4, generator=gen, device=device), dim=1)  # a random order per image
    apply = torch.rand(n, generator=gen, device=device) < spec.jitter_p
    col = lambda v: v[:, None, None, None]  # noqa: E731
    for slot in range(4):
        for op in (op for op in range(4) if spec.jitter[op] > 0):  # a zero strength is the identity: skip its work
            sel = col(apply & (order[:, slot] == op))
            f = factors[op]
            if op == 0:
                y = x * col(f)
            elif op == 1:
                mean = col(_gray(x).mean((1, 2, 3)))
                y = (x - mean) * col(f) + mean
            elif op == 2:
                y = _gray(x) + col(f) * (x - _gray(x))
            else:
                y = _shift_hue(x, f)
            x = torch.where(sel, y.clamp(0, 1), x)
    return x


def _blur(x, spec, gen):
    """torchvision's GaussianBlur (same kernel size, sigma uniform in (0.1, 2)), per image."""
    (n, _, H, _), k = x.shape, spec.blur_kernel
    sigma = _uniform(n, 0.1, 2.0, gen, x.device)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (n*3, k)
    y = x.reshape(1, n * 3, H, -1)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * 3)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern[:, None, :, None], groups=n * 3)
    apply = (torch.rand(n, generator=gen, device=x.device) < spec.blur_p)[:, None, None, None]
    return torch.where(apply, y.reshape(x.shape), x)


def batched_view(x: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of a uint8 batch (B, 3, H, W) on any device, as floats in [0, 1]
    (normalise afterwards). Every image draws its own parameters from gen."""
    (n, _, H, W), dev = x.shape, x.device
    top, left, h, w = _crop_boxes(n, H, W, spec, gen, dev)
    flip = torch.rand(n, generator=gen, device=dev) < spec.flip_p
    # Crop + resize + flip as one affine resampling (grid_sample coordinates are in [-1, 1]).
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.where(flip, -w / W, w / W), zero, (2 * left + w) / W - 1,
                         zero, h / H, (2 * top + h) / H - 1], 1).view(n, 2, 3)
    grid = F.affine_grid(theta, (n, 3, spec.crop, spec.crop), align_corners=False)
    # Keep samples between the crop's first and last pixel centres, as PIL's resize of a crop box
    # does (otherwise edge samples would blend in half a pixel from outside the box).
    lo = torch.stack([(2 * left + 1) / W - 1, (2 * top + 1) / H - 1], -1)[:, None, None]
    hi = torch.stack([(2 * (left + w) - 1) / W - 1, (2 * (top + h) - 1) / H - 1], -1)[:, None, None]
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    out = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = _jitter(out, spec, gen)
    gray = (torch.rand(n, generator=gen, device=dev) < spec.gray_p)[:, None, None, None]
    out = torch.where(gray, _gray(out).expand_as(out), out)
    if spec.blur_p > 0:
        out = _blur(out, spec, gen)
    solar = (torch.rand(n, generator=gen, device=dev) < spec.solarize_p)[:, None, None, None]
    return torch.where(solar & (out >= 128 / 255), 1 - out, out)


def views_on(augment_on: str, dataset: str, cuda: bool) -> str:
    """Where a run draws its views ('loader' or 'device'); auto: on the device on CUDA for every data set held in
    memory (all but imagefolder), since a GPU outruns the PIL workers, and in loader workers elsewhere."""
    if augment_on != "auto":
        return augment_on
    return "device" if cuda and dataset != "imagefolder" else "loader"


def images_as_tensor(base) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set as uint8 (N, 3, H, W) and labels (N,): CIFAR, STL-10 and digits hold arrays already."""
    data = getattr(base, "data", None)
    if isinstance(data, np.ndarray) and data.ndim == 4:
        x = torch.from_numpy(data)
        x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x  # CIFAR and digits store HWC, STL-10 CHW
        labels = base.targets if hasattr(base, "targets") else base.labels
        return x.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    images = [pil_to_tensor(image.convert("RGB")) for image, _ in base]
    if len({tuple(t.shape) for t in images}) > 1:
        raise DataError("--augment-on device needs images of one size; use --augment-on loader for this data set")
    return torch.stack(images), torch.tensor([y for _, y in base.samples] if hasattr(base, "samples") else base.targets)


def device_views(images, labels, specs, batches, seed: int, memory_format=torch.contiguous_format):
    """(x1, x2, y) batches like the loader's, drawn on the images' device. Each batch's draws come
    from a generator seeded by (seed, epoch, its first image), so resuming stays exact."""
    mean, std = (torch.tensor(v, device=images.device)[:, None, None] for v in (MEAN, STD))
    for keys in batches:
        epoch, first = keys[0]
        index = torch.tensor([i for _, i in keys], device=images.device)
        gen = torch.Generator(device=images.device).manual_seed(item_seed(seed, epoch, first))
        x = images[index]
        x1, x2 = ((batched_view(x, spec, gen) - mean) / std for spec in specs)
        yield x1.contiguous(memory_format=memory_format), x2.contiguous(memory_format=memory_format), labels[index]


if __name__ == "__main__":  # python data.py fashionmnist cifar10 [--data-dir data]: the data step alone, no run
    import tyro

    from typing import Literal

    def main(datasets: tuple[Literal[tuple(CROP_SIZE)], ...], /, data_dir: str = "data") -> None:
        """Download each data set into --data-dir (or say how to get it), as grid.py --download does."""
        for name in datasets:
            try:
                fetch(name, data_dir)
            except DataError as e:
                raise SystemExit(f"error: {e}") from None
            print(f"{name}: ready in {data_dir}")

    tyro.cli(main)
