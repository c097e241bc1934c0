# --- METHOD (BYOL): what this file trains ---
"""BYOL-style non-contrastive SSL: an EMA target network and LARS. The paper's ResNet-18 runs with a target.

    python train_byol.py [PRESET] [--dataset cifar10|cifar100|stl10|tinyimagenet|imagefolder|digits|fashionmnist]
                         [--field VALUE]

The paper's grid with an EMA target (METHOD.md section 6; train_simsiam.py has the runs without one):

    python train_byol.py                    --dataset cifar10     # BYOL: MLP predictor, cosine loss
    python train_byol.py directpred         --dataset cifar10     # closed-form W_P = C^0.5
    python train_byol.py directcopy         --dataset cifar10     # closed-form W_P = C / max + 0.25 I
    python train_byol.py isoloss            --dataset cifar10     # IsoLoss, DirectPred spectrum
    python train_byol.py isoloss-directcopy --dataset cifar10     # IsoLoss, DirectCopy spectrum
    python train_byol.py linear             --dataset cifar10     # learnable linear predictor (Fig. 4)
    torchrun --standalone --nproc_per_node 8 train_byol.py isoloss --dataset cifar100   # --batch-size is global

and the same with --dataset cifar100, stl10 (train + unlabeled, crop 96) or tinyimagenet --data-dir
data/tiny-imagenet-200 (crop 64); --download fetches CIFAR and STL-10. Every preset: LARS lr 1.0 x
batch/256, weight decay 1e-5 (Table 1 gives the closed-form rows 1e-4: grid.py), EMA momentum 0.99 -> 1 (cosine),
tau_c 0.998, batch 256, 1000 epochs.
Laptop trial on real images that need no download (scikit-learn's digits, minutes on two cores):

    python train_byol.py cpu-demo
    python train_byol.py laptop       # the long laptop run on Fashion-MNIST (paper_figures.py runs the figure sets)

The run directory (--out-dir, default runs/NAME-DATASET-sSEED) gets config.json, metrics.jsonl (a
line per epoch: see rundir.epoch_record), eigenvalues.png, online_readout.png, last.pt (atomically, every
epoch and every --save-every steps) and at the end backbone.pt, a plain torchvision ResNet-18
state_dict described by backbone.json. The same command again resumes, bit for bit on CPU.

This file and train_simsiam.py are deliberate copies (CleanRL style): outside the blocks marked
METHOD they are the same line for line (tests/test_train.py checks it), so `diff` shows the method.
"""
# --- END METHOD ---

from __future__ import annotations

import dataclasses
import math
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

import common
import data
import rundir


@dataclass(frozen=True)
class Args:
    # --- the run ---
    out_dir: str = ""
    """Run directory (checkpoints, metrics, figures). Default: runs/NAME-DATASET-sSEED."""
    dataset: Literal["cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder", "digits",
                     "fashionmnist"] = "cifar10"
    """stl10 pre-trains on train+unlabeled; imagefolder reads DIR/train/<class>/*, DIR/val/<class>/*;
    digits: scikit-learn's; fashionmnist: the IDX files in --data-dir or /usr/share/datasets/fashion-mnist
    (apt-get install dataset-fashion-mnist)."""
    data_dir: str = "data"
    """Where the data set is (tinyimagenet, imagefolder: the folder that holds train/ and val/)."""
    download: bool = False
    """Download CIFAR-10/100, STL-10 or Fashion-MNIST into --data-dir if they are missing."""
    seed: int = 0
    """Seeds the initialisation, the data order and every augmentation."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:1, ... Under torchrun each rank takes cuda:LOCAL_RANK."""
    num_workers: int | None = None
    """Data-loading processes per rank, alive across epochs (0: load in the main process). Default: the cores this
    process may use (grid.py gives each run its share), shared by the ranks on this machine, less one. Results do
    not change."""
    augment_on: Literal["auto", "loader", "device"] = "auto"
    """Draw the views with PIL in the loader workers, or batched per image on the device (same distributions).
    auto: on the device on CUDA for every data set held in memory (all but imagefolder: a GPU outruns the PIL
    workers), else the loader."""
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
    # --- the networks and the views ---
    width: float = 1.0
    """ResNet-18 width multiplier (0.25: a quarter of the channels, for CPUs). Width 1 exports a torchvision
    ResNet-18."""
    proj_hidden: int = 4096
    """Projector hidden size: Linear(512 w, h)-BN-ReLU-Linear(h, d)."""
    proj_dim: int = 256
    """Projector output size d (the size of C)."""
    pred_hidden: int = 4096
    """MLP predictor hidden size."""
    crop: int | None = None
    """Crop size of the views. Default: 32 (CIFAR, digits), 28 (Fashion-MNIST), 96 (STL-10), 64 (TinyImageNet,
    imagefolder); <= 32: the small (CIFAR) stem."""
    min_scale: float = 0.08
    """Smallest area of a random resized crop, as a fraction of the image (METHOD.md 6: 0.08)."""
    blur: tuple[float, float] | None = None
    """Gaussian-blur probability of view 1 and view 2. Default: (1.0, 0.1) for STL-10 and imagefolder, (0, 0)
    otherwise."""
    # --- the predictor and the loss (METHOD.md sections 2-3) ---
    predictor: Literal["mlp", "linear", "directpred", "directcopy", "none"] = "mlp"
    """mlp (BYOL/SimSiam), linear (learnable W), directpred/directcopy (closed form from C), none (ablation)."""
    loss: Literal["cosine", "euclidean"] = "cosine"
    """Per-sample loss between the prediction and the target."""
    isoloss: bool = False
    """IsoLoss: the same fixed points, the factor W_P^T removed from the gradient (closed-form predictors only)."""
    alpha: float | None = None
    """Closed-form predictor: W_P = U diag(s_hat^alpha) U^T. Default: 0.5 for directpred, 1 for directcopy."""
    eps: float | None = None
    """Closed-form predictor: s_hat = s / max(s) + eps. Default: 0 for directpred, 0.25 for directcopy."""
    normalize_spectrum: bool = True
    """Closed-form predictor: divide C's eigenvalues by the largest (the release's). --no-normalize-spectrum:
    s_hat = s + eps, the toy theory's W_P, whose Euclidean loss holds every mode's variance at 1 (the Euclidean loss
    needs it without EMA)."""
    # --- optimisation and monitoring (METHOD.md section 6) ---
    momentum: float = 0.9
    """Momentum of the optimiser."""
    weight_decay: float = 1e-5
    """Weight decay: 1e-5 in the release's configs; its Table 1 commands give the closed-form predictors 1e-4, as
    grid.py does (METHOD.md 6). make_optimizer says which parameters get it."""
    warmup_epochs: float = 10.0
    """Linear warm-up of the learning rate from 3e-5, then a cosine to zero (per step), as in the release."""
    readout_lr: float = 0.1
    """Online linear readout on detached features of both views: base learning rate at batch 256 (scaled by batch/256),
    trained by the method's optimiser with the same warm-up and cosine, no weight decay (the release's)."""
    knn_k: int = 20
    """Neighbours of the k-NN monitor (cosine; test split against up to 10,000 train images); 0 turns it off."""
    eval_every: int = 1
    """Evaluate (readout, k-NN, spectra of the test split) every this many epochs, and after the last."""
    collapse_ratio: float = 0.2
    """Warn about a collapse when the std of l2-normalised z falls below this fraction of the healthy 1/sqrt(d) ..."""
    collapse_epochs: int = 3
    """... for this many epochs in a row."""
    # --- METHOD (BYOL): Args of the method ---
    name: str = "byol"
    """Experiment name, set by the preset; it names the default run directory."""
    lr: float = 1.0
    """Base learning rate of LARS at batch 256 (scaled by batch/256)."""
    lars_eta: float = 0.02
    """LARS trust coefficient; the adapted rate is clipped at the global one."""
    tau_base: float = 0.99
    """EMA target momentum at the start; it follows a cosine per step ..."""
    tau_final: float = 1.0
    """... to this value at the last step."""
    tau_c: float = 0.998
    """Running correlation matrix C <- tau_c C + (1 - tau_c) Z^T Z / B (0.998 with an EMA target)."""


# The paper's grid with an EMA target (METHOD.md section 6); the command line overrides any field.
PRESETS = {
    "byol": ("BYOL: MLP predictor, cosine loss (the default).", Args()),
    "directpred": ("DirectPred: closed-form predictor W_P = C^0.5 (normalised).",
                   Args(name="byol-directpred", predictor="directpred")),
    "directcopy": ("DirectCopy: closed-form predictor W_P = C / max(s) + 0.25 I.",
                   Args(name="byol-directcopy", predictor="directcopy")),
    "isoloss": ("IsoLoss with the DirectPred spectrum (the paper's method).",
                Args(name="byol-isoloss", predictor="directpred", isoloss=True)),
    "isoloss-directcopy": ("IsoLoss with the DirectCopy spectrum.",
                           Args(name="byol-isoloss-directcopy", predictor="directcopy", isoloss=True)),
    "linear": ("Learnable linear predictor; logs the eigenvector alignment of W with C (Fig. 4).",
               Args(name="byol-linear", predictor="linear")),
    "cpu-demo": ("Laptop trial on scikit-learn's digits (IsoLoss, a quarter width, 16-pixel crops): "
                 "minutes on 2 CPU cores.",
                 Args(name="byol-cpu-demo", predictor="directpred", isoloss=True, dataset="digits", crop=16,
                      width=0.25, proj_hidden=512, pred_hidden=512, proj_dim=64, batch_size=64, epochs=20,
                      warmup_epochs=1,
                      num_workers=0, augment_on="device", eval_every=2, log_every=10, lr=2.0)),
    "laptop": ("Long laptop run on Fashion-MNIST (IsoLoss, a quarter width, 16-pixel crops, 2,400 steps): "
               "the regime of the paper's Figs. 3, 7 and 8 (paper_figures.py runs the sets); "
               "the paper's optimiser settings.",
               Args(name="byol-laptop", predictor="directpred", isoloss=True, dataset="fashionmnist", crop=16,
                    min_scale=0.2, width=0.25, proj_hidden=512, pred_hidden=512, proj_dim=64, batch_size=64,
                    epochs=24, steps_per_epoch=100, warmup_epochs=2, num_workers=0, augment_on="device",
                    eval_every=4, log_every=100)),
}
# --- END METHOD ---


def check_args(args: Args, world: int) -> None:
    """Contradictory or impossible settings: one clear line before anything is written."""
    closed = args.predictor in common.CLOSED_FORM
    problems = [
        (args.isoloss and not closed,
         f"--isoloss needs a closed-form predictor (directpred or directcopy), not --predictor {args.predictor}: "
         "IsoLoss removes the factor W_P^T from the gradient, which needs a symmetric linear W_P"),
        ((args.alpha is not None or args.eps is not None) and not closed,
         f"--alpha/--eps set the closed-form predictor's spectrum; --predictor {args.predictor} has none"),
        (not args.normalize_spectrum and not closed,
         f"--no-normalize-spectrum sets the closed-form predictor's spectrum; --predictor {args.predictor} has none"),
        ((args.alpha is not None and args.alpha <= 0) or (args.eps is not None and args.eps < 0),
         f"--alpha must be > 0 and --eps >= 0, got {args.alpha}, {args.eps}"),
        (not 0 <= args.tau_c < 1, f"--tau-c must be in [0, 1), got {args.tau_c}"),
        (args.batch_size < 2 * world,
         f"--batch-size {args.batch_size} leaves fewer than 2 samples per rank; BatchNorm needs 2"),
        (args.batch_size % world != 0, f"--batch-size {args.batch_size} does not split evenly over {world} ranks"),
        (args.crop is not None and args.crop < 8, f"--crop {args.crop} is too small for a ResNet-18 (use 8 or more)"),
        (not 0 < args.min_scale <= 1, f"--min-scale must be in (0, 1], got {args.min_scale}"),
        (args.overwrite and args.allow_changes,
         "--overwrite (start afresh) and --allow-changes (resume with new settings) contradict each other"),
        (args.augment_on == "device" and args.dataset == "imagefolder",
         "--augment-on device needs images of one size (not imagefolder); use --augment-on loader"),
        (args.amp == "fp16" and common.pick_device(args.device).type == "cpu",
         "--amp fp16 needs CUDA; use --amp bf16 or off on CPU"),
        # --- METHOD (BYOL): checks of the method ---
        (not (0 <= args.tau_base <= args.tau_final <= 1), "EMA momentum needs 0 <= --tau-base <= --tau-final <= 1"),
        # --- END METHOD ---
    ]
    positive = dict(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch or 1, log_every=args.log_every,
                    lr=args.lr, readout_lr=args.readout_lr, width=args.width, proj_hidden=args.proj_hidden,
                    proj_dim=args.proj_dim, pred_hidden=args.pred_hidden, collapse_epochs=args.collapse_epochs,
                    eval_every=args.eval_every)
    problems += [(v <= 0, f"--{k.replace('_', '-')} must be > 0, got {v}") for k, v in positive.items()]
    problems += [(v < 0, f"--{k.replace('_', '-')} must be >= 0, got {v}") for k, v in dict(
        num_workers=args.num_workers or 0, save_every=args.save_every, warmup_epochs=args.warmup_epochs,
        knn_k=args.knn_k).items()]
    for bad, message in problems:
        if bad:
            common.die(message)


# --- The model: backbone + projector, predictor, targets, online readout --------------------------


class Learner(nn.Module):
    """Everything that trains, in one module so that DDP sees it whole. forward(x1, x2, y) returns
    (loss to minimise, SSL loss, cosine loss, readout loss, std of l2-normalised z), all but the
    first detached. The targets are made where the stop-gradient is visible."""

    def __init__(self, args: Args, n_classes: int, small_stem: bool):
        super().__init__()
        self.args = args
        self.backbone = common.resnet18(args.width, small_stem)
        self.projector = nn.Sequential(nn.Linear(self.backbone.out_dim, args.proj_hidden),
                                       nn.BatchNorm1d(args.proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(args.proj_hidden, args.proj_dim))
        self.predictor = common.build_predictor(args.predictor, args.proj_dim, args.pred_hidden, args.tau_c,
                                               args.alpha, args.eps, args.normalize_spectrum)
        self.closed_form = isinstance(self.predictor, common.ClosedFormPredictor)
        # --- METHOD (BYOL): the target network ---
        # A copy of backbone + projector that gets no gradient: ema_update moves it towards the online one.
        from copy import deepcopy
        self.target = nn.Sequential(deepcopy(self.backbone), deepcopy(self.projector)).requires_grad_(False)
        # --- END METHOD ---
        self.readout = nn.Linear(self.backbone.out_dim, n_classes)
        if not self.closed_form:  # the spectrum is logged for every predictor: the others get a C of their own
            self.register_buffer("C", torch.zeros(args.proj_dim, args.proj_dim, dtype=torch.float64))

    def correlation(self) -> torch.Tensor:
        return self.predictor.C if self.closed_form else self.C

    def online_parameters(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def update_correlation(self, z: torch.Tensor) -> None:
        """Fold one view's batch into the running correlation matrix, C <- tau_c C + (1 - tau_c) Z^T Z / B, and,
        for a closed-form predictor, recompute W_P from the new C (ClosedFormPredictor.update); for the other
        predictors C is only logged."""
        if self.closed_form:
            self.predictor.update(z)
        else:
            self.C.mul_(self.args.tau_c).add_(common.correlation_batch(z), alpha=1 - self.args.tau_c)

    def forward(self, x1, x2, y):
        f1, f2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = common.at_least_float32(self.projector(f1)), common.at_least_float32(self.projector(f2))
        # --- METHOD (BYOL): the targets ---
        with torch.no_grad():  # the stop-gradient: targets from the EMA network
            t1, t2 = common.at_least_float32(self.target(x1)), common.at_least_float32(self.target(x2))
        stop_grad = True
        # --- END METHOD ---
        ssl = cosine = 0.0
        # The loss in float32 even under autocast: W_P z and the norms need the precision.
        with torch.autocast(x1.device.type, enabled=False):
            # View by view, as in the authors' release: C takes view 1's batch term and p1 = W_P z1 is predicted
            # with the W_P that includes it (toward t2); then the same for view 2 (toward t1). Orders summed.
            for z, t in ((z1, t2), (z2, t1)):
                self.update_correlation(z)
                value, pair_cosine = common.pair_loss(self.args.loss, self.args.isoloss, self.predictor, z, t,
                                                      stop_grad)
                ssl, cosine = ssl + value, cosine + pair_cosine
            self.last_pair = z2.detach(), t1.detach()  # the pair of the W_P held now: the epoch's gradient diagnostics
            # The readout sees detached features of both views (the release's): it measures the representation,
            # never shapes it. STL-10's unlabeled images have label -1 and do not count.
            labelled = 2 * (y >= 0).sum().clamp_min(1)
            ce = sum(F.cross_entropy(self.readout(common.at_least_float32(f.detach())), y, ignore_index=-1,
                                     reduction="sum")
                     for f in (f1, f2)) / labelled
        return ssl + ce, ssl.detach(), cosine, ce.detach(), common.normalized_std(torch.cat([z1, z2]))


# --- Optimiser and schedules (plain functions of the step), and the step -------------------------


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start: float = 3e-5) -> float:
    """The release's schedule: linear from `start` (3e-5, whatever the peak) at step 0 to `peak` at step
    warmup_steps - 1, then a cosine from `peak` at warmup_steps to zero at total_steps."""
    if step < warmup_steps:
        return start + step * (peak - start) / max(1, warmup_steps - 1)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


# --- METHOD (BYOL): optimiser and the step ---
def make_optimizer(args: Args, learner: Learner) -> common.LARS:
    """LARS, in the release's groups: the network (backbone, projector, a learnable predictor) with weight
    decay, its biases and norm layers (1-d) with neither decay nor LARS adaptation; the online readout
    without decay (its weight adapted by LARS, its bias not), at its own learning rate (see `peaks`)."""
    net, readout = [*learner.online_parameters(), *learner.predictor.parameters()], [*learner.readout.parameters()]
    groups = [dict(params=[p for p in net if p.ndim > 1], name="ssl"),
              dict(params=[p for p in net if p.ndim <= 1], name="ssl", weight_decay=0.0, lars=False),
              dict(params=[p for p in readout if p.ndim > 1], name="readout", weight_decay=0.0),
              dict(params=[p for p in readout if p.ndim <= 1], name="readout", weight_decay=0.0, lars=False)]
    return common.LARS(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, eta=args.lars_eta)


def tau_at(step: int, total_steps: int, base: float, final: float) -> float:
    """BYOL's EMA momentum: base at step 0, final at total_steps, a cosine in between."""
    return final - (final - base) * 0.5 * (1 + math.cos(math.pi * step / total_steps))


@torch.no_grad()
def ema_update(target: nn.Sequential, online_params, tau: float) -> None:
    """target <- tau target + (1 - tau) online, parameter by parameter (tau = 0 copies the online network).
    The target's BatchNorm statistics are its own: it runs in training mode like the online one."""
    for pt, po in zip(target.parameters(), online_params):
        pt.mul_(tau).add_(po, alpha=1 - tau)


def train_step(model, learner: Learner, optimizer, scaler, x1, x2, y, autocast, tau: float):
    """Both views forward, backward, one optimiser step (network and readout), then the EMA target follows the online
    network.
    Returns the model's outputs (loss, SSL loss, cosine loss, readout loss, std); no host synchronisation."""
    with autocast():
        loss, ssl, cosine, ce, std = model(x1, x2, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    ema_update(learner.target, learner.online_parameters(), tau)
    return loss, ssl, cosine, ce, std
# --- END METHOD ---


# --- Evaluation ------------------------------------------------------------


@torch.no_grad()
def evaluate(learner: Learner, test_loader, bank_loader, device, autocast) -> dict:
    """Health of the representation on clean images in eval mode (BatchNorm on running statistics): online
    readout and k-NN top-1 (cosine, k = knn_k, against train images) on the test split; centred covariance
    spectra and effective rank (RankMe) of its backbone features f and projector outputs z; the mean's
    share of E|z|^2 (which the uncentred C holds). Each rank does its share; all get the gathered numbers."""
    learner.eval()

    def outputs(loader):
        rows = []
        for x, y in loader:
            with autocast():
                f = learner.backbone(x.to(device, non_blocking=True)).float()
                rows.append((f, learner.projector(f).float(), learner.readout(f).float(), y.to(device)))
        return [rundir.gather(torch.cat(column)) for column in zip(*rows)]
    f, z, logits, y = outputs(test_loader)
    (top1, top5), cov_f, cov_z, zd = (common.topk_accuracy(logits, y), common.centred_spectrum(f),
                                      common.centred_spectrum(z), z.double())
    out = dict(online_readout_top1=100 * top1, online_readout_top5=100 * top5, knn_top1=None,
               erank_f=common.effective_rank(cov_f), erank_z=common.effective_rank(cov_z),
               mean_share_z=float(zd.mean(0).square().sum() / zd.square().sum(1).mean()),
               cov_f_eigenvalues=cov_f.tolist(), cov_z_eigenvalues=cov_z.tolist())
    if bank_loader is not None:
        bank_f, _, _, bank_y = outputs(bank_loader)
        scores = common.knn_scores(bank_f, bank_y, f, logits.shape[1], learner.args.knn_k)
        out["knn_top1"] = 100 * common.topk_accuracy(scores, y, ks=(1,))[0]
        # A linear probe on the same standardised features: it sees learning that the raw features' mean hides.
        probe = common.probe_scores(bank_f, bank_y, f, logits.shape[1])
        out["probe_top1"] = 100 * common.topk_accuracy(probe, y, ks=(1,))[0]
    learner.train()
    return out


# --- Training -------------------------------------------------------------------------------------


def train(args: Args) -> Learner:
    """Train with `args` (resuming from the run directory when it holds this run); returns the model."""
    rank, world, device = rundir.setup_distributed(args.device)
    main_rank, cuda = rank == 0, device.type == "cuda"
    check_args(args, world)
    augment_on = data.views_on(args.augment_on, args.dataset, cuda)
    workers = common.loader_workers() if args.num_workers is None else args.num_workers
    say = (lambda *a: print(*a, flush=True)) if main_rank else (lambda *a: None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get("bf16" if args.amp == "auto" and cuda else args.amp)

    # Data first: a missing data set is one line, before anything is written.
    crop = args.crop or data.CROP_SIZE[args.dataset]
    blur = args.blur or ((1.0, 0.1) if args.dataset in ("stl10", "imagefolder") else (0.0, 0.0))
    test_view = data.eval_transform(args.dataset, crop)
    if not main_rank:
        dist.barrier()  # rank 0 downloads (if asked) before the others look
    try:
        base = data.load_dataset(args.dataset, args.data_dir, "pretrain", download=args.download)
        test_set = data.load_dataset(args.dataset, args.data_dir, "test", test_view, download=args.download)
        bank_set = data.load_dataset(args.dataset, args.data_dir, "train", test_view) if args.knn_k else None
    except data.DataError as e:
        common.die(str(e))
    if main_rank and world > 1:
        dist.barrier()
    if args.dataset != "imagefolder" and crop > min(size := base[0][0].size):
        common.die(f"--crop {crop} is larger than the {'x'.join(map(str, size))} images of {args.dataset}; "
                   f"use --crop {min(size)} or less")
    steps_per_epoch = min(len(base) // args.batch_size, args.steps_per_epoch or sys.maxsize)
    if steps_per_epoch < 1:
        common.die(f"--batch-size {args.batch_size} is larger than the {len(base)} training images of {args.dataset}")
    total_steps, warmup_steps = steps_per_epoch * args.epochs, round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256
    peaks = dict(ssl=peak_lr, readout=args.readout_lr * args.batch_size / 256)  # by param group name
    out = Path(args.out_dir or f"runs/{args.name}-{args.dataset}-s{args.seed}")
    settings = {**dataclasses.asdict(args), "augment_on": augment_on}  # auto resolved: a resumed run keeps its views
    ckpt = rundir.open_run(out, settings)

    torch.manual_seed(args.seed)
    small_stem = common.uses_small_stem(crop)
    learner = Learner(args, len(test_set.classes), small_stem).to(device)
    if cuda:
        learner = learner.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    optimizer = make_optimizer(args, learner)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    parts = dict(model=learner, optimizer=optimizer, scaler=scaler)
    # epoch_sums: the sums over this epoch's steps of, in this order, the SSL loss, the cosine loss, the readout loss
    # and the std of l2-normalised z (rundir.epoch_record reads them by position; last.pt keeps them).
    step, epoch_sums, low_std_epochs, elapsed = 0, torch.zeros(4, dtype=torch.float64, device=device), 0, 0.0
    if ckpt is not None:
        rundir.restore(ckpt, parts, out)
        step, low_std_epochs, elapsed = ckpt["step"], ckpt["low_std_epochs"], ckpt["elapsed"]
        epoch_sums.copy_(ckpt["epoch_sums"])
        diff = rundir.settings_diff(ckpt["args"], settings)
        say(f"resuming {out / 'last.pt'} at step {step}"
            + (f" with changed settings: {'; '.join(diff)}" if diff else ""))
    if main_rank:  # every check has passed: from here on the run directory is written (by rank 0 only)
        rundir.start(out, settings, step)

    model = learner
    if world > 1:
        # SyncBatchNorm exists for GPUs only; on CPUs (gloo) each rank normalises with its own batch,
        # and the running statistics are averaged over the ranks at the end of each epoch. No buffer
        # broadcast: C is all-reduced in the step, and rank 0's copy would hide a rank that drifted.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(learner) if cuda else learner
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                                    broadcast_buffers=False)
    model = torch.compile(model) if args.compile else model

    # The loaders are made once; the training loader's worker processes (if any) live across epochs.
    specs = data.view_specs(crop, blur, args.min_scale, grayscale=args.dataset in data.GRAYSCALE)
    batches = data.EpochBatches(len(base), args.batch_size, steps_per_epoch, args.seed, rank, world)
    train_loader = None if augment_on == "device" else data.loader(
        data.TwoViews(base, tuple(map(data.pil_view, specs)), args.seed), workers, cuda, True, batch_sampler=batches)
    if augment_on == "device":
        images, labels = (t.to(device) for t in data.images_as_tensor(base))
    bank = torch.randperm(len(bank_set or ()), generator=torch.Generator().manual_seed(0))[:10_000].sort().values
    test_loader, bank_loader = (None if ds is None
                                else data.loader(torch.utils.data.Subset(ds, index[rank::world].tolist()),
                                                 workers, cuda, batch_size=max(2, args.batch_size // world))
                                for ds, index in ((test_set, torch.arange(len(test_set))), (bank_set, bank)))
    if (len(test_set) + len(bank)) * 12 * crop**2 < 2**28:  # the clean views never change: under 256 MB, read them once
        test_loader, bank_loader = (loader and list(loader) for loader in (test_loader, bank_loader))
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    memory_format = torch.channels_last if cuda else torch.contiguous_format

    def save(at_step: int) -> None:
        """last.pt, after checking that nothing in it is NaN (the previous one stays otherwise)."""
        rundir.check_finite(bad_step, learner, at_step, out)
        if world > 1:  # rank 0 saves, so the epoch's sums it holds must be everyone's
            dist.all_reduce(epoch_sums)
            epoch_sums.div_(world)
        if main_rank:
            rundir.save(out, settings, at_step, parts, epoch_sums=epoch_sums.cpu(), low_std_epochs=low_std_epochs,
                        elapsed=elapsed + time.perf_counter() - t_start)

    say(f"{args.name}: {args.dataset} ({len(base)} images, crop {crop}), {world} x {device}, amp {amp_dtype}, "
        f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, batch {args.batch_size}, lr {peak_lr:.4g} -> {out}")
    if step >= total_steps:
        say(f"{out} already finished (step {step} of {total_steps}); backbone in {out / 'backbone.pt'}")
    progress = common.Progress(total_steps * args.batch_size, "img", start=step * args.batch_size)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)  # first step (1-based) whose loss was not finite
    t_start, lr, tau = time.perf_counter(), lr_at(step, total_steps, warmup_steps, peak_lr), None
    for epoch in range(step // steps_per_epoch, args.epochs):
        batches.set_epoch(epoch, step % steps_per_epoch)
        t_epoch, epoch_start_step = time.perf_counter(), step
        source = data.device_views(images, labels, specs, batches, args.seed, memory_format) \
            if augment_on == "device" else train_loader
        for x1, x2, y in source:
            lr = lr_at(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, peaks[group["name"]])
            x1, x2 = (x.to(device, non_blocking=True, memory_format=memory_format) for x in (x1, x2))
            y = y.to(device, non_blocking=True)
            try:
                # --- METHOD (BYOL): the step ---
                tau = tau_at(step, total_steps, args.tau_base, args.tau_final)
                loss, ssl, cosine, ce, std = train_step(model, learner, optimizer, scaler,
                                                       x1, x2, y, autocast, tau)
                # --- END METHOD ---
            except FloatingPointError as e:  # raised by ClosedFormPredictor.update, C unchanged
                common.die(f"step {step + 1}: {e}. {rundir.stopped_message(out)}")
            # Bookkeeping on the device: no host synchronisation except on logging steps.
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step + 1, bad_step)
            epoch_sums += torch.stack([ssl, cosine, ce, std]).double()
            step += 1
            if step % args.log_every == 0:
                rundir.check_finite(bad_step, None, step, out)
                say(progress.line(step * args.batch_size, epoch=epoch + 1, step=step, loss=ssl.item(), lr=lr))
            if args.save_every and step % args.save_every == 0 and step % steps_per_epoch != 0:
                save(step)  # mid-epoch; the end of an epoch is saved below, after its metrics

        # End of the epoch: evaluate, append the metrics line, redraw the figures, then save.
        seconds = time.perf_counter() - t_epoch
        if world > 1:
            dist.all_reduce(epoch_sums)
            epoch_sums.div_(world)
            if not cuda:
                rundir.average_batchnorm_statistics(learner)
        rundir.check_finite(bad_step, learner, step, out)  # before evaluating: NaN weights would only break the metrics
        health = evaluate(learner, test_loader, bank_loader, device, autocast) \
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs else {}
        record = rundir.epoch_record(learner, epoch + 1, step, epoch_sums, steps_per_epoch, health, lr=lr, tau=tau,
                                     images_per_s=(step - epoch_start_step) * args.batch_size / seconds,
                                     train_s=seconds, epoch_s=time.perf_counter() - t_epoch,
                                     wall_time_s=elapsed + time.perf_counter() - t_start)
        healthy = 1 / math.sqrt(args.proj_dim)
        low_std_epochs = low_std_epochs + 1 if record["std_normalized_z"] < args.collapse_ratio * healthy else 0
        record["collapse_warning"] = low_std_epochs >= args.collapse_epochs
        epoch_sums.zero_()
        if main_rank:
            rundir.append_metrics(out, record, args.epochs)
            if record["collapse_warning"]:
                print(f"warning: possible collapse: the std of l2-normalised z has been below {args.collapse_ratio} x "
                      f"{healthy:.4f} (healthy) for {low_std_epochs} epochs (now {record['std_normalized_z']:.2e})",
                      file=sys.stderr, flush=True)
        save(step)

    if main_rank:
        rundir.export_backbone(learner.backbone, out, width=args.width, small_stem=small_stem,
                               out_dim=learner.backbone.out_dim, dataset=args.dataset, crop=crop, mean=data.MEAN,
                               std=data.STD, step=step, name=args.name)
    rundir.finish(train_loader)
    return learner


def parse(argv=None) -> Args:
    """[PRESET] [--field value ...]: the preset's Args (the first preset when none is named), overridden."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and not argv[0].startswith("-") else next(iter(PRESETS))
    if name not in PRESETS:
        common.die(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}, or none for {next(iter(PRESETS))}")
    listing = "\n".join(f"  {k:<20s}{doc}" for k, (doc, _) in PRESETS.items())
    return tyro.cli(Args, args=argv, default=PRESETS[name][1],
                    description=f"{__doc__}\npresets (first argument):\n{listing}")


def main(argv=None) -> Learner:
    args = parse(argv)
    try:
        return train(args)
    except data.DataError as e:  # an unreadable image met while training, here or in a loader worker
        common.die(str(e))


if __name__ == "__main__":
    main()
