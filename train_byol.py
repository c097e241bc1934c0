"""Deep non-contrastive SSL with an EMA target (BYOL-style): the paper's ResNet-18 runs, one command each.

    python train_byol.py PRESET [--dataset cifar10|cifar100|stl10|tinyimagenet|imagefolder] [--any-field VALUE]

The paper's grid with an EMA target (SPEC section 6; train_simsiam.py has the runs without one):

    python train_byol.py byol               --dataset cifar10     # MLP predictor, cosine loss, wd 1e-5
    python train_byol.py directpred         --dataset cifar10     # closed-form W_P = C^0.5, wd 1e-4
    python train_byol.py directcopy         --dataset cifar10     # closed-form W_P = C / max + 0.25 I, wd 1e-4
    python train_byol.py isoloss            --dataset cifar10     # IsoLoss, DirectPred spectrum, wd 1e-4
    python train_byol.py isoloss-directcopy --dataset cifar10     # IsoLoss, DirectCopy spectrum, wd 1e-4
    python train_byol.py linear             --dataset cifar10     # learnable linear predictor (Fig. 4)

and the same with --dataset cifar100, --dataset stl10 (train + unlabeled, crop 96) and
--dataset tinyimagenet --data-dir data/tiny-imagenet-200 (crop 64). CIFAR and STL-10 download
themselves with --download. Laptop trial (no GPU, a few minutes on two cores; any small
DIR/train/<class>/* + DIR/val/<class>/* tree, e.g. Imagenette):

    python train_byol.py cpu-demo --data-dir data/imagenette2-160

Several GPUs or nodes: the same command under torchrun (--batch-size stays the global batch):

    torchrun --standalone --nproc_per_node 8 train_byol.py isoloss --dataset cifar100
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint HOST:29500 --nproc_per_node 8 train_byol.py byol --dataset stl10

Everything goes to the run directory (--out-dir, default runs/PRESET-DATASET-sSEED): config.json,
metrics.jsonl (one line per epoch, see `epoch_record`), eigenvalues.png, online_readout.png,
last.pt (written atomically every epoch and every --save-every steps) and, at the end,
backbone.pt (a plain torchvision ResNet-18 state_dict, described in backbone.json).

Resuming: run the same command again. The run continues from last.pt and ends bit for bit where
an uninterrupted run would have (on CPU; the data order and every augmentation are functions of
(seed, epoch, image index), never of worker state). A run directory that holds a run with other
settings is refused; --overwrite starts afresh, --allow-changes resumes with the new settings.

Reading order: Args and presets, data, model, optimiser and schedules, metrics and figures,
checkpoints, the training loop, main.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

import common as C


@dataclass(frozen=True)
class Args:
    # --- the run ---------------------------------------------------------------------------
    name: str = "byol"
    """Experiment name, set by the preset; it names the default run directory."""
    out_dir: str = ""
    """Run directory (checkpoints, metrics, figures). Default: runs/NAME-DATASET-sSEED."""
    dataset: Literal["cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder"] = "cifar10"
    """Data set. stl10 pre-trains on train+unlabeled; imagefolder reads DIR/train/<class>/* and DIR/val/<class>/*."""
    data_dir: str = "data"
    """Where the data set is (tinyimagenet, imagefolder: the folder that holds train/ and val/)."""
    download: bool = False
    """Download CIFAR-10/100 or STL-10 into --data-dir if they are missing."""
    seed: int = 0
    """Seeds the initialisation, the data order and every augmentation."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ... Under torchrun each rank takes cuda:LOCAL_RANK."""
    num_workers: int = 4
    """Data-loading processes per rank (0 loads in the main process). Does not change the results."""
    augment_on: Literal["loader", "device"] = "loader"
    """Where the two views are drawn: loader (PIL, per image, in --num-workers processes) or device (the whole
    training set as one uint8 tensor on the device, batched tensor augmentation; for GPUs, which the PIL path
    cannot feed: see bench.py). Same parameters and distributions; cifar10/cifar100/stl10/tinyimagenet only."""
    epochs: int = 1000
    """Training epochs."""
    batch_size: int = 256
    """Global batch size (split over the ranks under torchrun); the learning rate scales with batch/256."""
    steps_per_epoch: int | None = None
    """Bound the steps of an epoch (smoke tests, CPU trials). Default: all full batches of the data set."""
    log_every: int = 50
    """Print a progress line (and check for NaN) every this many steps."""
    save_every: int = 0
    """Also write last.pt every this many steps (0: only at the end of each epoch)."""
    overwrite: bool = False
    """Start afresh in a run directory that already holds a run (its checkpoint, metrics and figures are deleted)."""
    allow_changes: bool = False
    """Resume a run although some settings differ from its checkpoint's (they are listed when it starts)."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision: auto is bf16 on CUDA and off on CPU; fp16 adds a gradient scaler."""
    compile: bool = False
    """torch.compile the model (slow to start, faster per step on GPUs)."""

    # --- the method (SPEC sections 1-3) --------------------------------------------------------
    predictor: Literal["mlp", "linear", "directpred", "directcopy", "none"] = "mlp"
    """mlp (BYOL/SimSiam), linear (learnable W), directpred/directcopy (closed form from C), none (ablation)."""
    loss: Literal["cosine", "euclidean"] = "cosine"
    """Per-sample loss between the prediction and the target."""
    isoloss: bool = False
    """IsoLoss: the same fixed points, the factor W_P^T removed from the gradient (closed-form predictors only)."""
    ema: bool = True
    """Targets from an EMA copy of the online network (BYOL). Off: shared weights, targets are the online outputs (SimSiam)."""
    stop_grad: bool = True
    """Stop the gradient at the targets. --no-stop-grad is the collapse ablation (needs --no-ema)."""
    alpha: float | None = None
    """Closed-form predictor: W_P = U diag(s_hat^alpha) U^T. Default: 0.5 for directpred, 1 for directcopy."""
    eps: float | None = None
    """Closed-form predictor: s_hat = s / max(s) + eps. Default: 0 for directpred, 0.25 for directcopy."""
    tau_c: float = 0.998
    """Running correlation matrix C <- tau_c C + (1 - tau_c) Z^T Z / B (0.998 with EMA, 0.5 without)."""

    # --- the networks ----------------------------------------------------------------------
    width: float = 1.0
    """ResNet-18 width multiplier (0.25: a quarter of the channels, for CPUs). Width 1 exports a torchvision ResNet-18."""
    proj_hidden: int = 4096
    """Projector hidden size: Linear(512 w, h)-BN-ReLU-Linear(h, d)."""
    proj_dim: int = 256
    """Projector output size d (the size of C)."""
    pred_hidden: int = 4096
    """MLP predictor hidden size."""
    crop: int | None = None
    """Crop size of the views. Default: 32 (CIFAR), 96 (STL-10), 64 (TinyImageNet, imagefolder). <= 64 uses the small stem."""
    blur: tuple[float, float] | None = None
    """Gaussian-blur probability of view 1 and view 2. Default: (1.0, 0.1) for STL-10 and imagefolder, (0, 0) otherwise."""

    # --- optimisation (SPEC section 6) ---------------------------------------------------------
    optimizer: Literal["lars", "sgd"] = "lars"
    """lars (with EMA) or sgd (without); both use momentum, biases and norm layers get no weight decay."""
    lr: float = 1.0
    """Base learning rate at batch 256 (scaled by batch/256): 1.0 with LARS, 0.1 with SGD."""
    momentum: float = 0.9
    """Momentum of the optimiser."""
    weight_decay: float = 1e-5
    """1e-5 for MLP/linear predictors, 1e-4 for the closed-form ones."""
    lars_eta: float = 0.02
    """LARS trust coefficient; the adapted rate is clipped at the global one."""
    warmup_epochs: float = 10.0
    """Linear warm-up of the learning rate, then a cosine to zero (per step)."""
    tau_base: float = 0.99
    """EMA target momentum at the start; it follows a cosine per step ..."""
    tau_final: float = 1.0
    """... to this value at the last step."""
    readout_lr: float = 0.1
    """Learning rate of the online linear readout (SGD, momentum 0.9, constant)."""
    collapse_ratio: float = 0.2
    """Warn about a collapse when the std of l2-normalised z falls below this fraction of the healthy 1/sqrt(d) ..."""
    collapse_epochs: int = 3
    """... for this many epochs in a row."""


# The presets: the paper's grid with an EMA target (SPEC section 6). train_simsiam.py defines the
# ones without. Each is an Args; the command line overrides any field.
_CLOSED = dict(weight_decay=1e-4)
PRESETS = {
    "byol": ("BYOL: MLP predictor, cosine loss, EMA target, LARS.", Args(name="byol")),
    "directpred": ("DirectPred: closed-form predictor W_P = C^0.5 (normalised).",
                   Args(name="byol-directpred", predictor="directpred", **_CLOSED)),
    "directcopy": ("DirectCopy: closed-form predictor W_P = C / max(s) + 0.25 I.",
                   Args(name="byol-directcopy", predictor="directcopy", **_CLOSED)),
    "isoloss": ("IsoLoss with the DirectPred spectrum (the paper's method).",
                Args(name="byol-isoloss", predictor="directpred", isoloss=True, **_CLOSED)),
    "isoloss-directcopy": ("IsoLoss with the DirectCopy spectrum.",
                           Args(name="byol-isoloss-directcopy", predictor="directcopy", isoloss=True, **_CLOSED)),
    "linear": ("Learnable linear predictor; logs the eigenvector alignment of W with C (Fig. 4).",
               Args(name="byol-linear", predictor="linear")),
    "cpu-demo": ("Laptop trial: IsoLoss at a quarter width on a small ImageFolder, minutes on two CPU cores.",
                 Args(name="byol-cpu-demo", predictor="directpred", isoloss=True, dataset="imagefolder",
                      data_dir="data/imagenette2-160", crop=32, blur=(0.0, 0.0), width=0.25, proj_hidden=512,
                      pred_hidden=512, proj_dim=64, batch_size=64, epochs=6, steps_per_epoch=50,
                      warmup_epochs=1, num_workers=2, log_every=10, lr=2.0, tau_base=0.99, **_CLOSED)),
}


# ---------------------------------------------------------------------------------------------
# Checks of the configuration: one clear line before anything is written
# ---------------------------------------------------------------------------------------------


def check_args(args: Args, world: int) -> None:
    closed = args.predictor in C.CLOSED_FORM
    problems = [
        (args.isoloss and not closed,
         f"--isoloss needs a closed-form predictor (directpred or directcopy), not --predictor {args.predictor}: "
         "IsoLoss removes the factor W_P^T from the gradient, which needs a symmetric linear W_P"),
        (args.isoloss and not args.stop_grad, "--isoloss is built from stop-gradients; it cannot run with --no-stop-grad"),
        (not args.stop_grad and args.ema,
         "--no-stop-grad is the shared-weights ablation: the EMA target gets no gradient anyway (use train_simsiam.py or --no-ema)"),
        ((args.alpha is not None or args.eps is not None) and not closed,
         f"--alpha/--eps set the closed-form predictor's spectrum; --predictor {args.predictor} has none"),
        (args.alpha is not None and args.alpha <= 0, f"--alpha must be > 0, got {args.alpha}"),
        (args.eps is not None and args.eps < 0, f"--eps must be >= 0, got {args.eps}"),
        (not 0 <= args.tau_c < 1, f"--tau-c must be in [0, 1), got {args.tau_c}"),
        (args.batch_size < 2 * world,
         f"--batch-size {args.batch_size} leaves fewer than 2 samples per rank; BatchNorm needs at least 2"),
        (args.batch_size % world != 0, f"--batch-size {args.batch_size} does not split evenly over {world} ranks"),
        (args.epochs < 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.steps_per_epoch is not None and args.steps_per_epoch < 1,
         f"--steps-per-epoch must be >= 1, got {args.steps_per_epoch}"),
        (args.num_workers < 0, f"--num-workers must be >= 0, got {args.num_workers}"),
        (args.log_every < 1 or args.save_every < 0, "--log-every must be >= 1 and --save-every >= 0"),
        (args.lr <= 0 or args.readout_lr <= 0, "--lr and --readout-lr must be > 0"),
        (args.width <= 0, f"--width must be > 0, got {args.width}"),
        (min(args.proj_hidden, args.proj_dim, args.pred_hidden) < 1, "--proj-hidden, --proj-dim, --pred-hidden must be >= 1"),
        (args.crop is not None and args.crop < 8, f"--crop {args.crop} is too small for a ResNet-18 (use 8 or more)"),
        (args.warmup_epochs < 0, "--warmup-epochs must be >= 0"),
        (not (0 <= args.tau_base <= args.tau_final <= 1), "EMA momentum needs 0 <= --tau-base <= --tau-final <= 1"),
        (args.overwrite and args.allow_changes,
         "--overwrite (start afresh) and --allow-changes (resume with new settings) contradict each other"),
        (args.augment_on == "device" and args.dataset == "imagefolder",
         "--augment-on device needs a data set of one image size (cifar10, cifar100, stl10, tinyimagenet); "
         "use --augment-on loader for imagefolder"),
        (args.amp == "fp16" and C.pick_device(args.device).type == "cpu",
         "--amp fp16 needs CUDA; use --amp bf16 or off on CPU"),
    ]
    for bad, message in problems:
        if bad:
            C.die(message)


# ---------------------------------------------------------------------------------------------
# Data: two asymmetric views per image, drawn from (seed, epoch, index) only
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation (SPEC 6), shared by the PIL path and the batched device path."""

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


def view_specs(crop: int, blur: tuple[float, float]) -> tuple[ViewSpec, ViewSpec]:
    """SPEC 6: crop, flip, colour jitter (p 0.8), grayscale (p 0.2), blur; view 2 adds solarisation (p 0.2)."""
    return ViewSpec(crop, blur_p=blur[0]), ViewSpec(crop, blur_p=blur[1], solarize_p=0.2)


def pil_view(spec: ViewSpec, normalize: bool = True):
    """The view as torchvision transforms on a PIL image (the data-loader path)."""
    from torchvision import transforms as T
    steps = [T.RandomResizedCrop(spec.crop, scale=spec.scale, ratio=spec.ratio),
             T.RandomHorizontalFlip(spec.flip_p),
             T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p),
             T.RandomGrayscale(spec.gray_p)]
    if spec.blur_p > 0:
        steps.append(T.RandomApply([T.GaussianBlur(spec.blur_kernel, sigma=(0.1, 2.0))], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=spec.solarize_p))
    return T.Compose(steps + [T.ToTensor()] + ([T.Normalize(C.MEAN, C.STD)] if normalize else []))


class TwoViews(torch.utils.data.Dataset):
    """Indexed by (epoch, index): returns two augmented views and the label of image `index`.

    The random draws of the augmentations come from a generator seeded by (seed, epoch, index),
    so an image gets the same views whichever worker loads it and whether or not the run was
    resumed: this is what makes resuming exact. Each image gets its own draws (not one per batch).
    """

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


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 4_294_967_311 + index) % 2**63


class EpochBatches:
    """Batch sampler of one epoch: a permutation seeded by (seed, epoch), cut into global batches,
    each rank taking its slice; starts at batch `start` so that a resumed run skips what was done.
    Incomplete batches are dropped (BatchNorm statistics of a tiny last batch are noise)."""

    def __init__(self, n: int, batch: int, steps: int, seed: int, epoch: int, start: int, rank: int, world: int):
        self.n, self.batch, self.steps, self.seed, self.epoch = n, batch, steps, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        per_rank = self.batch // self.world
        for s in range(self.start, self.steps):
            lo = s * self.batch + self.rank * per_rank
            yield [(self.epoch, i) for i in order[lo: lo + per_rank].tolist()]


def loader_for(dataset, batches, num_workers: int, cuda: bool):
    # An own generator keeps the DataLoader from drawing its worker base seed from the global
    # one; no augmentation depends on it (see TwoViews), but the global state then stays ours.
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=cuda, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# Batched augmentation on the device (--augment-on device)
# ---------------------------------------------------------------------------------------------
# The PIL pipeline does about 1,000 images/s (two views) per CPU core (bench.py): a GPU that trains
# ResNet-18 on 32x32 images at ~20,000 images/s would need ~20 loader processes. This path draws
# the same per-image random parameters as torchvision's transforms (same distributions, the jitter
# operations in a random order per image) and applies them to a whole uint8 batch on the device.
# Known departures, all small: bilinear resampling without antialiasing (crops are upsampled on
# the native-size data sets this path serves, where the two agree), contrast and hue computed in
# floating point rather than on 8-bit values, and draws that are not the same numbers as the PIL
# path's (tests/test_augment.py compares the distributions).


def _uniform(n, lo, hi, gen, device):
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _crop_boxes(n, H, W, spec, gen, device):
    """torchvision's RandomResizedCrop.get_params for n images at once: (top, left, h, w)."""
    area = torch.full((n, 10), float(H * W), device=device)
    target = area * _uniform((n, 10), *spec.scale, gen, device)
    log_r = _uniform((n, 10), math.log(spec.ratio[0]), math.log(spec.ratio[1]), gen, device)
    aspect = torch.exp(log_r)
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
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(delta > 0, (h / 6) % 1, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift[:, None, None]) % 1
    v = maxc
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 1)
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, *i.shape[1:])).squeeze(1)


def _jitter(x, spec, gen):
    """torchvision's ColorJitter per image: four factors, applied in a random order, with p jitter_p."""
    n, device = x.shape[0], x.device
    b, c, s, h = spec.jitter
    factors = [_uniform(n, 1 - b, 1 + b, gen, device), _uniform(n, 1 - c, 1 + c, gen, device),
               _uniform(n, 1 - s, 1 + s, gen, device), _uniform(n, -h, h, gen, device)]
    order = torch.argsort(torch.rand(n, 4, generator=gen, device=device), dim=1)  # a random order per image
    apply = torch.rand(n, generator=gen, device=device) < spec.jitter_p
    col = lambda v: v[:, None, None, None]
    for slot in range(4):
        for op in range(4):
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
    n, _, H, _ = x.shape
    k = spec.blur_kernel
    p = spec.blur_p
    sigma = _uniform(n, 0.1, 2.0, gen, x.device)
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (n*3, k)
    y = x.reshape(1, n * 3, H, -1)
    y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kern[:, None, None, :], groups=n * 3)
    y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kern[:, None, :, None], groups=n * 3)
    apply = (torch.rand(n, generator=gen, device=x.device) < p)[:, None, None, None]
    return torch.where(apply, y.reshape(x.shape), x)


def batched_view(x: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of a uint8 batch (B, 3, H, W) on any device, as floats in [0, 1]
    (normalise afterwards). Every image draws its own parameters from gen."""
    n, _, H, W = x.shape
    dev = x.device
    top, left, h, w = _crop_boxes(n, H, W, spec, gen, dev)
    flip = torch.rand(n, generator=gen, device=dev) < spec.flip_p
    # Crop + resize + flip as one affine resampling (grid_sample coordinates are in [-1, 1]).
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = torch.where(flip, -w / W, w / W)
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
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


def images_as_tensor(base) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set as uint8 (N, 3, H, W) and labels (N,): CIFAR and STL-10 hold arrays already."""
    import numpy as np
    from torchvision.transforms.functional import pil_to_tensor
    data = getattr(base, "data", None)
    if isinstance(data, np.ndarray) and data.ndim == 4:
        x = torch.from_numpy(data)
        x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x  # CIFAR stores HWC, STL-10 CHW
        labels = base.targets if hasattr(base, "targets") else base.labels
        return x.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    images = [pil_to_tensor(image.convert("RGB")) for image, _ in base]
    if len({tuple(t.shape) for t in images}) > 1:
        C.die("--augment-on device needs images of one size; use --augment-on loader for this data set")
    return torch.stack(images), torch.tensor([y for _, y in base.samples] if hasattr(base, "samples") else base.targets)


def device_views(images, labels, specs, batches: "EpochBatches", seed: int, memory_format):
    """(x1, x2, y) batches like the loader's, drawn on the images' device. Each batch's draws come
    from a generator seeded by (seed, epoch, its first image), so resuming stays exact."""
    mean = torch.tensor(C.MEAN, device=images.device)[:, None, None]
    std = torch.tensor(C.STD, device=images.device)[:, None, None]
    for keys in batches:
        epoch, first = keys[0]
        index = torch.tensor([i for _, i in keys], device=images.device)
        gen = torch.Generator(device=images.device).manual_seed(item_seed(seed, epoch, first))
        x = images[index]
        x1, x2 = ((batched_view(x, spec, gen) - mean) / std for spec in specs)
        yield x1.contiguous(memory_format=memory_format), x2.contiguous(memory_format=memory_format), labels[index]


# ---------------------------------------------------------------------------------------------
# The model: backbone + projector, predictor, EMA target, online readout
# ---------------------------------------------------------------------------------------------


def projector(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class Learner(nn.Module):
    """Everything that trains, in one module so that DDP sees it whole.

    forward(x1, x2, y) returns (loss to minimise, SSL loss, plain cosine loss, readout loss, std of
    l2-normalised z), all but the first detached. The targets are computed where the stop-gradient
    is visible: by the EMA target under no_grad (BYOL), or as the online outputs themselves
    (SimSiam), which symmetric_loss detaches unless the no-stop-gradient ablation asks otherwise.
    """

    def __init__(self, args: Args, n_classes: int, small_stem: bool):
        super().__init__()
        self.args = args
        self.backbone = C.resnet18(args.width, small_stem)
        self.projector = projector(self.backbone.out_dim, args.proj_hidden, args.proj_dim)
        self.predictor = C.build_predictor(args.predictor, args.proj_dim, args.pred_hidden, args.tau_c, args.alpha, args.eps)
        self.closed_form = isinstance(self.predictor, C.ClosedFormPredictor)
        self.target = None
        if args.ema:
            self.target = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector)).requires_grad_(False)
        self.readout = nn.Linear(self.backbone.out_dim, n_classes)
        if not self.closed_form:
            # The spectrum is logged for every predictor, so the others get their own running C
            # (same rule and tau_c as the closed-form predictor's; used for nothing but logging).
            self.register_buffer("C", torch.zeros(args.proj_dim, args.proj_dim, dtype=torch.float64))

    def correlation(self) -> torch.Tensor:
        return self.predictor.C if self.closed_form else self.C

    def online_parameters(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def forward(self, x1, x2, y):
        f1, f2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(f1).float(), self.projector(f2).float()
        if self.target is not None:
            with torch.no_grad():
                t1, t2 = self.target(x1).float(), self.target(x2).float()
        else:
            t1, t2 = z1, z2
        z = torch.cat([z1, z2]).detach()
        if self.closed_form:
            self.predictor.update(z)  # before predicting: W_P of this step includes this batch
        else:
            track_correlation(self.C, z, self.args.tau_c)
        # The loss in float32 even under autocast: W_P z and the norms need the precision.
        with torch.autocast(x1.device.type, enabled=False):
            ssl, plain = C.symmetric_loss(self.args.loss, self.args.isoloss, self.predictor, z1, z2, t1, t2,
                                          stop_grad=self.args.stop_grad)
            # The readout sees detached features: it measures the representation, never shapes it.
            # STL-10's unlabeled images have label -1 and do not count.
            logits = self.readout(f1.detach().float())
            ce = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum") / (y >= 0).sum().clamp_min(1)
        return ssl + ce, ssl.detach(), plain, ce.detach(), C.normalized_std(z)


@torch.no_grad()
def track_correlation(Cm: torch.Tensor, z: torch.Tensor, tau: float) -> None:
    """C <- tau C + (1 - tau) Z^T Z / B, as ClosedFormPredictor.update does (for logging only)."""
    Cm.mul_(tau).add_(C.correlation_batch(z), alpha=1 - tau)


@torch.no_grad()
def ema_update(target: nn.Sequential, online_params, tau: float) -> None:
    """target <- tau target + (1 - tau) online, parameter by parameter (tau = 0 copies the online network).
    The target's BatchNorm statistics are its own: it runs in training mode like the online one."""
    for pt, po in zip(target.parameters(), online_params):
        pt.mul_(tau).add_(po, alpha=1 - tau)


# ---------------------------------------------------------------------------------------------
# Optimisers and schedules (plain functions of the step)
# ---------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """Momentum SGD whose step for each weight tensor is scaled by the trust ratio
    eta |w| / (|g| + wd |w|) (You et al. 2017), clipped so that the adapted rate never exceeds
    the global one. Groups with lars=False (biases, norm layers) get plain momentum SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["lars"]:
                    wd = group["weight_decay"]
                    w_norm, g_norm = p.norm(), g.norm()
                    trust = group["eta"] * w_norm / (g_norm + wd * w_norm)
                    # torch.where instead of an `if` on the norms: no host synchronisation.
                    scale = torch.where((w_norm > 0) & (g_norm > 0), (trust / group["lr"]).clamp(max=1.0), 1.0)
                    g = (g + wd * p) * scale
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])


def make_optimizer(args: Args, params):
    # Biases and norm-layer parameters (1-d) get neither weight decay nor LARS adaptation.
    weights = [p for p in params if p.ndim > 1]
    others = [p for p in params if p.ndim <= 1]
    groups = [dict(params=weights), dict(params=others, weight_decay=0.0, lars=False)]
    if args.optimizer == "lars":
        return LARS(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, eta=args.lars_eta)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak` over warmup_steps, then a cosine to zero at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def tau_at(step: int, total_steps: int, base: float, final: float) -> float:
    """BYOL's EMA momentum: base at step 0, final at total_steps, a cosine in between."""
    return final - (final - base) * 0.5 * (1 + math.cos(math.pi * step / total_steps))


# ---------------------------------------------------------------------------------------------
# Evaluation, metrics and figures
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def online_readout(learner: Learner, loader, device, autocast) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of the online readout on the test split; backbone in eval mode."""
    learner.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = learner.readout(learner.backbone(x).float()).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)]).double()
    learner.train()
    if dist.is_initialized():
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return 100 * top1 / max(n, 1), 100 * top5 / max(n, 1)


def epoch_record(learner: Learner, epoch: int, step: int, sums: torch.Tensor, n_steps: int, top: tuple[float, float],
                 lr: float, tau: float | None, images_per_s: float, wall: float) -> dict:
    """One line of metrics.jsonl. Losses are means over the epoch's steps (and ranks); eigenvalues
    are those of the running correlation matrix C of the projector outputs, ascending."""
    ssl, plain, ce, std = (sums / max(n_steps, 1)).tolist()
    s = torch.linalg.eigvalsh(learner.correlation())
    record = dict(epoch=epoch, step=step, loss=ssl, cosine_loss=plain, readout_loss=ce,
                  online_readout_top1=top[0], online_readout_top5=top[1],
                  eigenvalues=s.tolist(), participation_ratio=C.participation_ratio(s), std_normalized_z=std,
                  lr=lr, tau=tau, images_per_s=images_per_s, wall_time_s=wall)
    if learner.args.predictor == "linear":
        record["eigenvector_alignment"] = C.eigenvector_alignment(learner.predictor.weight, learner.correlation()).tolist()
    return record


def read_metrics(path: Path) -> list[dict]:
    """The lines of metrics.jsonl; a line torn by a kill in the middle of its write is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def plot(out: Path, records: list[dict]) -> None:
    """eigenvalues.png (log scale, as Figs. 3, 7, 8) and online_readout.png, redrawn from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    eig = torch.tensor([r["eigenvalues"] for r in records], dtype=torch.float64).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, eig.flip(1).numpy(), color="tab:blue", lw=0.6, alpha=0.6)
    ax.set(yscale="log", xlabel="epoch", ylabel="eigenvalue of C",
           title=f"spectrum of the projector outputs (participation ratio {records[-1]['participation_ratio']:.1f})")
    fig.tight_layout()
    fig.savefig(out / "eigenvalues.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(epochs, [r["online_readout_top1"] for r in records], "o-", label="top-1")
    a1.plot(epochs, [r["online_readout_top5"] for r in records], "o-", label="top-5")
    a1.set(xlabel="epoch", ylabel="accuracy (%)", title="online readout (test split)")
    a1.legend()
    d = len(records[-1]["eigenvalues"])
    a2.plot(epochs, [r["std_normalized_z"] for r in records], "o-")
    a2.axhline(1 / math.sqrt(d), color="gray", ls="--", label="healthy 1/sqrt(d)")
    a2.set(xlabel="epoch", ylabel="std of l2-normalised z", title="collapse indicator", ylim=(0, None))
    a2.legend()
    fig.tight_layout()
    fig.savefig(out / "online_readout.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Run directory and checkpoints
# ---------------------------------------------------------------------------------------------

# Fields that change how a run is executed or reported, never its results: they may differ on resume.
RUNTIME_FIELDS = {"out_dir", "data_dir", "download", "device", "num_workers", "log_every", "save_every",
                  "overwrite", "allow_changes", "compile"}
CHECKPOINT_KEYS = ("format", "args", "step", "model", "optimizer", "readout_optimizer", "scaler", "rng",
                   "epoch_sums", "low_std_epochs", "elapsed")
FORMAT = "isoloss-train-1"
RUN_FILES = ("last.pt", "metrics.jsonl", "config.json", "eigenvalues.png", "online_readout.png", "backbone.pt",
             "backbone.json")


def settings_diff(old: dict, new: dict) -> list[str]:
    keys = (old.keys() | new.keys()) - RUNTIME_FIELDS
    return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in sorted(keys) if old.get(k) != new.get(k)]


def open_run(args: Args, out: Path) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run; refuses a run with other settings.
    Reads only: nothing is written before every check has passed."""
    ckpt_path, config_path = out / "last.pt", out / "config.json"
    if args.overwrite:
        return None
    previous, ckpt = None, None
    if ckpt_path.exists():
        try:
            ckpt = C.load_checkpoint(ckpt_path)
        except C.CheckpointError as e:
            C.die(f"{e} (or pass --overwrite to start this run afresh)")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing or ckpt.get("format") != FORMAT:
            C.die(f"{ckpt_path}: not a checkpoint of this version of the training scripts (missing {', '.join(missing) or 'format'}); "
                  "move it away or pass --overwrite to start afresh")
        previous = ckpt["args"]
    elif config_path.exists():
        try:
            previous = json.loads(config_path.read_text())
        except (OSError, ValueError) as e:
            C.die(f"{config_path}: unreadable ({e}); move it away or pass --overwrite")
    if previous is not None:
        diff = settings_diff(previous, dataclasses.asdict(args))
        if diff and not args.allow_changes:
            C.die(f"{out} holds a run with other settings ({'; '.join(diff)}): use another --out-dir, "
                  "--overwrite to start afresh, or --allow-changes to resume with the new settings")
    return ckpt


def rng_state(device) -> dict:
    # Tensors and plain Python only, so that checkpoints load with weights_only=True. Nothing here
    # draws from numpy, so its state is not kept.
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def export_backbone(learner: Learner, out: Path, small_stem: bool, crop: int, args: Args, step: int) -> None:
    """backbone.pt: a plain state_dict (torchvision names, no fc); backbone.json says how to build it."""
    state = {k: v.detach().cpu().contiguous() for k, v in learner.backbone.state_dict().items()}
    C.atomic_save(state, out / "backbone.pt")
    meta = dict(arch="resnet18", width=args.width, small_stem=small_stem, out_dim=learner.backbone.out_dim,
                dataset=args.dataset, crop=crop, mean=C.MEAN, std=C.STD, step=step, name=args.name)
    C.atomic_write_text(out / "backbone.json", json.dumps(meta, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun one process per device, NCCL on GPUs, gloo on CPUs."""
    if "RANK" not in os.environ:
        return 0, 1, C.pick_device(device_name)
    device = C.pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(args: Args) -> Learner:
    """Train with `args` (resuming from the run directory when it holds this run); returns the model."""
    rank, world, device = setup_distributed(args.device)
    main_rank = rank == 0
    check_args(args, world)
    say = (lambda *a: print(*a, flush=True)) if main_rank else (lambda *a: None)
    cuda = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get("bf16" if args.amp == "auto" and cuda else args.amp)

    # Data first: a missing data set is one line, before anything is written.
    crop = args.crop or C.CROP_SIZE[args.dataset]
    blur = args.blur if args.blur is not None else ((1.0, 0.1) if args.dataset in ("stl10", "imagefolder") else (0.0, 0.0))
    if not main_rank:
        dist.barrier()  # rank 0 downloads (if asked) before the others look
    try:
        base = C.load_dataset(args.dataset, args.data_dir, "pretrain", download=args.download)
        native = C.CROP_SIZE[args.dataset]
        test_set = C.load_dataset(args.dataset, args.data_dir, "test",
                                  C.eval_transform(args.dataset if crop == native else "imagefolder", crop),
                                  download=args.download)
    except C.DataError as e:
        C.die(str(e))
    if main_rank and world > 1:
        dist.barrier()
    if args.dataset != "imagefolder" and crop > min(base[0][0].size):
        C.die(f"--crop {crop} is larger than the {'x'.join(map(str, base[0][0].size))} images of {args.dataset}; "
              f"use --crop {min(base[0][0].size)} or less")
    steps_per_epoch = min(len(base) // args.batch_size, args.steps_per_epoch or sys.maxsize)
    if steps_per_epoch < 1:
        C.die(f"--batch-size {args.batch_size} is larger than the {len(base)} training images of {args.dataset}")
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256

    out = Path(args.out_dir or f"runs/{args.name}-{args.dataset}-s{args.seed}")
    ckpt = open_run(args, out)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    small_stem = crop <= 64
    learner = Learner(args, C.num_classes(test_set), small_stem).to(device)
    if cuda:
        learner = learner.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    optimizer = make_optimizer(args, [*learner.online_parameters(), *learner.predictor.parameters()])
    readout_optimizer = torch.optim.SGD(learner.readout.parameters(), lr=args.readout_lr, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, sums, low_std_epochs, elapsed = 0, torch.zeros(4, dtype=torch.float64, device=device), 0, 0.0
    if ckpt is not None:
        try:
            learner.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            readout_optimizer.load_state_dict(ckpt["readout_optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            C.die(f"{out / 'last.pt'}: does not fit this model ({str(e).splitlines()[0]}); "
                  "use another --out-dir or --overwrite")
        set_rng_state(ckpt["rng"], device)
        step, low_std_epochs, elapsed = ckpt["step"], ckpt["low_std_epochs"], ckpt["elapsed"]
        sums.copy_(ckpt["epoch_sums"])
        diff = settings_diff(ckpt["args"], dataclasses.asdict(args))
        say(f"resuming {out / 'last.pt'} at step {step}" + (f" with changed settings: {'; '.join(diff)}" if diff else ""))

    # Every check has passed: from here on the run directory is written (by rank 0 only).
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a process killed while it was saving
            stale.unlink()
        C.atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(args), indent=1) + "\n")
        # metrics.jsonl holds exactly the epochs up to the checkpoint: lines a killed run wrote
        # after its last checkpoint are dropped, and will be written again identically.
        kept = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] <= step]
        C.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    model = learner
    if world > 1:
        # SyncBatchNorm exists for GPUs only; on CPUs (gloo) each rank normalises with its own
        # batch, and the running statistics are averaged over the ranks at the end of each epoch.
        if cuda:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(learner)
        # No buffer broadcast: C is all-reduced in the step, and rank 0's copy would hide a rank that drifted.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                    broadcast_buffers=False)
    if args.compile:
        model = torch.compile(model)

    specs = view_specs(crop, blur)
    if args.augment_on == "device":
        images, labels = (t.to(device) for t in images_as_tensor(base))
    else:
        train_set = TwoViews(base, tuple(map(pil_view, specs)), args.seed)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(test_set, range(rank, len(test_set), world)),
                                              batch_size=max(2, args.batch_size // world), num_workers=args.num_workers,
                                              pin_memory=cuda)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    memory_format = torch.channels_last if cuda else torch.contiguous_format

    def save(at_step: int) -> None:
        """last.pt, atomically, after checking that nothing in it is NaN (the previous one stays otherwise)."""
        check_finite(bad_step, learner, at_step, out)
        if world > 1:  # rank 0 saves, so the epoch sums it holds must be everyone's
            dist.all_reduce(sums)
            sums.div_(world)
        if main_rank:
            C.atomic_save(dict(format=FORMAT, args=dataclasses.asdict(args), step=at_step, model=learner.state_dict(),
                               optimizer=optimizer.state_dict(), readout_optimizer=readout_optimizer.state_dict(),
                               scaler=scaler.state_dict(), rng=rng_state(device), epoch_sums=sums.cpu(),
                               low_std_epochs=low_std_epochs, elapsed=elapsed + time.perf_counter() - t_start),
                          out / "last.pt")

    say(f"{args.name}: {args.dataset} ({len(base)} images, crop {crop}), {world} x {device}, amp {amp_dtype}, "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, batch {args.batch_size}, lr {peak_lr:.4g} -> {out}")
    if step >= total_steps:
        say(f"{out} already finished (step {step} of {total_steps}); backbone in {out / 'backbone.pt'}")
    progress = C.Progress(total_steps * args.batch_size, "img", start=step * args.batch_size)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step (1-based) whose loss was not finite
    t_start = time.perf_counter()
    lr, tau = lr_at(step, total_steps, warmup_steps, peak_lr), None
    for epoch in range(step // steps_per_epoch, args.epochs):
        batches = EpochBatches(len(base), args.batch_size, steps_per_epoch, args.seed, epoch,
                               step % steps_per_epoch, rank, world)
        t_epoch, epoch_start_step = time.perf_counter(), step
        if args.augment_on == "device":
            source = device_views(images, labels, specs, batches, args.seed, memory_format)
        else:
            source = loader_for(train_set, batches, args.num_workers, cuda)
        for x1, x2, y in source:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1 = x1.to(device, non_blocking=True, memory_format=memory_format)
            x2 = x2.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            if learner.target is not None:
                tau = tau_at(step, total_steps, args.tau_base, args.tau_final)
            try:
                loss, ssl, plain, ce, std = train_step(model, learner, optimizer, readout_optimizer, scaler,
                                                       x1, x2, y, autocast, tau)
            except FloatingPointError as e:  # raised by ClosedFormPredictor.update, C unchanged
                C.die(f"step {step + 1}: {e}. {stopped_message(out)}")
            # Bookkeeping on the device: no host synchronisation except on logging steps.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step + 1, bad_step)
            sums += torch.stack([ssl, plain, ce, std]).double()
            step += 1
            if step % args.log_every == 0:
                check_finite(bad_step, None, step, out)
                say(progress.line(step * args.batch_size, epoch=epoch + 1, step=step, loss=ssl.item(), lr=lr))
            if args.save_every and step % args.save_every == 0 and step % steps_per_epoch != 0:
                save(step)  # mid-epoch; the end of an epoch is saved below, after its metrics

        # End of the epoch: evaluate, append the metrics line, redraw the figures, then save.
        seconds = time.perf_counter() - t_epoch
        if world > 1:
            dist.all_reduce(sums)
            sums.div_(world)
            if not cuda:
                average_batchnorm_statistics(learner)
        check_finite(bad_step, None, step, out)
        top = online_readout(learner, test_loader, device, autocast)
        record = epoch_record(learner, epoch + 1, step, sums, steps_per_epoch, top, lr, tau,
                              (step - epoch_start_step) * args.batch_size / seconds,
                              elapsed + time.perf_counter() - t_start)
        healthy = 1 / math.sqrt(args.proj_dim)
        low_std_epochs = low_std_epochs + 1 if record["std_normalized_z"] < args.collapse_ratio * healthy else 0
        record["collapse_warning"] = low_std_epochs >= args.collapse_epochs
        sums.zero_()
        if main_rank:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            plot(out, read_metrics(out / "metrics.jsonl"))
            say(f"epoch {epoch + 1}/{args.epochs}  step {step}  loss {record['loss']:.4f}  "
                f"online_readout top-1 {top[0]:.2f}% top-5 {top[1]:.2f}%  participation ratio "
                f"{record['participation_ratio']:.1f}  std(z/|z|) {record['std_normalized_z']:.4f}")
            if record["collapse_warning"]:
                print(f"warning: possible collapse: the std of l2-normalised z has been below {args.collapse_ratio} x "
                      f"{healthy:.4f} (healthy) for {low_std_epochs} epochs (now {record['std_normalized_z']:.2e})",
                      file=sys.stderr, flush=True)
        save(step)

    if main_rank:
        export_backbone(learner, out, small_stem, crop, args, step)
        say(f"done: {out / 'backbone.pt'} (plain torchvision ResNet-18 state_dict), metrics in {out / 'metrics.jsonl'}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return learner


def train_step(model, learner: Learner, optimizer, readout_optimizer, scaler, x1, x2, y, autocast, tau):
    """One optimisation step: both views forward, backward, both optimisers, then the EMA target
    (tau None: no target). Returns the model's outputs (loss, ssl, plain cosine, readout, std); no
    host synchronisation. bench.py times this same function."""
    with autocast():
        loss, ssl, plain, ce, std = model(x1, x2, y)
    optimizer.zero_grad(set_to_none=True)
    readout_optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.step(readout_optimizer)
    scaler.update()
    if tau is not None:
        ema_update(learner.target, learner.online_parameters(), tau)
    return loss, ssl, plain, ce, std


def average_batchnorm_statistics(learner: Learner) -> None:
    """Without SyncBatchNorm (CPUs) each rank's running statistics follow its own batches; average them."""
    for m in learner.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for b in (m.running_mean, m.running_var):
                dist.all_reduce(b)
                b.div_(dist.get_world_size())


def stopped_message(out: Path) -> str:
    last = out / "last.pt"
    try:
        where = f"the last good checkpoint is {last} (step {C.load_checkpoint(last)['step']})"
    except C.CheckpointError:
        where = "no checkpoint was written yet"
    return (f"The run stopped; {where}. Lower --lr or turn --amp off, and rerun with --allow-changes to resume "
            "from it (the same settings would reach the same fault again).")


def check_finite(bad_step: torch.Tensor, learner: Learner | None, step: int, out: Path) -> None:
    """Stop on NaN/Inf in any loss so far (and, before a save, in the weights); one host sync."""
    bad = bad_step.clone()
    if dist.is_initialized():  # every rank must stop together, or the others would hang
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    first = int(bad)
    if first >= 0:
        C.die(f"NaN or Inf in the loss at step {first}. {stopped_message(out)}")
    if learner is not None:
        finite = torch.stack([torch.isfinite(t).all() for t in learner.state_dict().values() if t.is_floating_point()]).all()
        if not finite:
            C.die(f"NaN or Inf in the weights after step {step}, not saved. {stopped_message(out)}")


def main(presets=PRESETS, argv=None, doc: str = __doc__) -> Learner:
    args = tyro.extras.overridable_config_cli(presets, args=argv, description=doc)
    return train(args)


if __name__ == "__main__":
    main()
