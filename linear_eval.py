"""Offline linear evaluation and k-NN of a trained ResNet-18 backbone.

Evaluate the backbone of a training run (either training script writes RUN/backbone.pt):
    python linear_eval.py --checkpoint runs/byol_cifar10/backbone.pt --dataset cifar10
    python linear_eval.py --checkpoint runs/simsiam_stl10/last.pt --dataset stl10 --data-dir data
A plain torchvision ResNet-18 state_dict (its fc.* keys are dropped), your own image folders:
    python linear_eval.py --checkpoint resnet18.pth --dataset imagefolder --data-dir DIR --crop 224
The classic protocol (augmentations through the frozen backbone every epoch; slow):
    python linear_eval.py --checkpoint RUN/backbone.pt --dataset cifar10 --augment --classifier sgd
Output (default: the checkpoint's folder): linear_eval.json with both results and the settings,
linear_classifier.pt (standardisation + linear layer), features_*.pt (the feature cache); a
table of the same numbers is printed at the end.

Two labels, so that nobody mixes them up with the training scripts' online readout (a linear
layer trained alongside pre-training on augmented views, METHOD.md section 6):
  offline_linear  a linear classifier trained after pre-training on the frozen backbone's
                  features of the labelled train split; top-1 / top-5 on the test split.
  knn             weighted k-NN on the same features: cosine similarity, the k = 20 and 200
                  nearest train images vote for their class with weight exp(similarity / 0.07)
                  (temperature 0.07, as in InstDisc and DINO); top-1 / top-5 on the test split.

The protocol, step by step:
  1. The backbone is loaded, frozen (requires_grad False) and put in eval mode, so BatchNorm
     uses its stored statistics; a hash of all its weights and buffers is taken.
  2. Features (the 512 * width average-pooled outputs) of the train and test splits are
     extracted once, centre crop / no augmentation (data.eval_transform), and cached in the
     output folder under a name keyed by that hash, the data set, the split, the crop and the
     dtype: a different checkpoint never reuses a stale cache, the same one never recomputes.
  3. Hyper-parameters (weight decay; and learning rate for SGD) are chosen on a held-out part
     of the train split (--val-fraction), never on the test split; the classifier is then refit
     on the full train split. Features are standardised with the mean and std of the data the
     classifier is fitted on. Default classifier: full-batch L-BFGS (multinomial logistic
     regression, a convex problem, started from zero: deterministic); --classifier sgd trains by
     minibatch SGD on the feature tensor.
  4. The backbone hash is taken again: the run fails if the weights changed.

What --checkpoint accepts: a state_dict of common.resnet18 (any width; 3x3 stem = small stem, run
with the release's padding 2, which a state_dict cannot record; 7x7 = ImageNet stem; fc.* keys
dropped), which includes torchvision's resnet18().state_dict();
or a dict holding one somewhere: under 'backbone' first (the training scripts' last.pt), else
any nested dict, and key prefixes such as 'module.' or 'online.backbone.' are stripped (an EMA
'target' / 'momentum' / 'teacher' copy is only taken if nothing else is there). Anything else
(a ResNet-50, other keys) is refused with one line that says what was found.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# cuBLAS is only deterministic with a fixed workspace; it must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
from common import CheckpointError, die, knn_scores, topk_accuracy  # noqa: E402
from data import CROP_SIZE, DataError  # noqa: E402


@dataclass
class Args:
    checkpoint: str
    """backbone to evaluate: RUN/backbone.pt, RUN/last.pt, or a torchvision resnet18 state_dict"""
    dataset: Literal["cifar10", "cifar100", "stl10", "tinyimagenet", "imagefolder", "digits",
                     "fashionmnist"] = "cifar10"
    """labelled data set: its train split fits the classifier, its test split is reported"""
    data_dir: str = "data"
    """root of the data set (as in the training scripts; imagefolder: DIR with train/ and val/)"""
    download: bool = False
    """download cifar10 / cifar100 / stl10 / fashionmnist into --data-dir if missing (needs internet)"""
    out_dir: str | None = None
    """where linear_eval.json, the classifier and the feature cache go (None: the checkpoint's folder)"""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ..."""
    seed: int = 0
    """seeds the held-out split, the SGD initialisation and order, and the --augment draws"""
    batch_size: int = 256
    """images per batch for feature extraction, and the SGD minibatch size"""
    num_workers: int = 2
    """DataLoader worker processes for reading images (0: read in the main process)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """autocast dtype of the backbone on CUDA (features are stored in float32; CPU always float32)"""
    crop: int | None = None
    """resize and centre-crop size (None: the crop the backbone was trained at, from backbone.json beside the
    checkpoint, else the data set's native size)"""

    classifier: Literal["lbfgs", "sgd"] = "lbfgs"
    """lbfgs: full-batch L-BFGS on the cached features; sgd: minibatch SGD (momentum 0.9, cosine lr)"""
    wds: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    """weight decays in the sweep (L2 penalty 0.5 * wd * |W|^2 on top of the mean cross-entropy)"""
    lrs: tuple[float, ...] = (0.03, 0.3)
    """SGD learning rates in the sweep (lbfgs ignores them: its line search sets the step)"""
    val_fraction: float = 0.1
    """part of the train split held out to choose the sweep's best setting (the test split never is)"""
    lbfgs_iters: int = 200
    """L-BFGS iterations per fit"""
    epochs: int = 100
    """SGD epochs per fit (passes over the cached features, or over the images with --augment)"""
    augment: bool = False
    """classic protocol: the final fit runs the frozen backbone on random-resized-crop + flip views every epoch
    (needs --classifier sgd; the sweep still runs on the cached features, to stay affordable)"""
    knn_k: tuple[int, ...] = (20, 200)
    """neighbour counts of the k-NN evaluation"""
    knn_temperature: float = 0.07
    """k-NN vote weight exp(cosine similarity / temperature)"""


# ---------------------------------------------------------------------------------------------
# Loading the backbone: find a ResNet-18 state_dict in whatever the file holds
# ---------------------------------------------------------------------------------------------

# A ResNet-18 has these (two BasicBlocks per stage); a ResNet-34 also has layer1.2.*, a
# ResNet-50 has layer1.0.conv3.* (Bottleneck blocks).
_FIRST, _LAST = "conv1.weight", "layer4.1.bn2.weight"
_EMA_WORDS = ("target", "momentum", "teacher", "ema")


def _resnet_prefixes(tensors: dict) -> list[str]:
    """Key prefixes p for which p + conv1.weight and p + layer4.1.bn2.weight both exist."""
    found = [k[: -len(_LAST)] for k in tensors if k.endswith(_LAST)]
    found = [p for p in found if p + _FIRST in tensors]
    # Prefer the online network over an EMA copy, then the shortest prefix.
    return sorted(found, key=lambda p: (any(w in p.lower() for w in _EMA_WORDS), len(p), p))


def find_resnet_state(obj: dict) -> tuple[dict, str] | None:
    """Breadth-first search for a ResNet state_dict; returns (state_dict, where it was) or None."""
    queue = [(obj, "")]
    while queue:
        d, where = queue.pop(0)
        tensors = {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        prefixes = _resnet_prefixes(tensors)
        if prefixes:
            p = prefixes[0]
            state = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
            return state, where + (f" (prefix {p!r})" if p else "")
        children = [(k, v) for k, v in d.items() if isinstance(v, dict)]
        children.sort(key=lambda kv: kv[0] != "backbone")  # the training scripts' entry first
        queue += [(v, f"{where}[{k!r}]") for k, v in children]
    return None


def _all_tensor_keys(obj: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            keys.append(prefix + str(k))
        elif isinstance(v, dict):
            keys += _all_tensor_keys(v, f"{prefix}{k}.")
    return keys


def _architecture_hint(keys) -> str:
    """What a ResNet that is not a ResNet-18 probably is, from its keys."""
    if any(k.endswith("layer1.0.conv3.weight") for k in keys):
        return "a ResNet-50/101/152 (Bottleneck blocks: found layer1.0.conv3.weight)"
    if any(k.endswith("layer1.2.conv1.weight") for k in keys):
        return "a ResNet-34 or deeper (three or more blocks per stage: found layer1.2.conv1.weight)"
    return ""


def _diagnose(path: Path, obj: dict) -> str:
    keys = _all_tensor_keys(obj)
    if not keys:
        return (f"{path}: holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:6]))}); "
                "not a backbone checkpoint")
    if hint := _architecture_hint(keys):
        return f"{path}: is {hint}; this script evaluates ResNet-18 backbones"
    return (f"{path}: holds no ResNet-18 state_dict (no conv1.weight with layer4.1.bn2.weight beside it; "
            f"first keys: {', '.join(keys[:4])})")


def load_backbone(path: str | Path) -> tuple[nn.Module, dict]:
    """common.resnet18 with the checkpoint's weights, width and stem; raises CheckpointError."""
    path = Path(path)
    obj = common.load_checkpoint(path)
    found = find_resnet_state(obj)
    if found is None:
        raise CheckpointError(_diagnose(path, obj))
    state, where = found
    at = f" (at {where})" if where else ""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state[_FIRST]
    if conv1.dim() != 4 or conv1.shape[1] != 3 or conv1.shape[2] not in (3, 7):
        raise CheckpointError(f"{path}: conv1.weight{at} has shape {tuple(conv1.shape)}; a ResNet-18 stem "
                              "is (C, 3, 3, 3) (small stem) or (C, 3, 7, 7) (ImageNet stem)")
    width, small_stem = conv1.shape[0] / 64, conv1.shape[2] == 3
    model = common.resnet18(width, small_stem)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if hint := _architecture_hint(unexpected):
        raise CheckpointError(f"{path}: is {hint}; this script evaluates ResNet-18 backbones")
    if missing or unexpected:
        raise CheckpointError(f"{path}: not a ResNet-18 state_dict{at}: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k}{at} has shape {tuple(state[k].shape)}, a ResNet-18 of width {width:g} "
                                  f"(from conv1) needs {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)
    return model, dict(width=width, small_stem=small_stem, found_at=where or "top level", out_dim=model.out_dim)


def freeze(backbone: nn.Module) -> nn.Module:
    """No gradients, and eval mode: BatchNorm uses its stored statistics and never updates them."""
    backbone.requires_grad_(False)
    return backbone.eval()


def state_hash(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes): the backbone's identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_unchanged(backbone: nn.Module, reference: str) -> None:
    """The SimSiam hygiene check: evaluation must not have touched a weight or a BN statistic."""
    if state_hash(backbone) != reference:
        raise RuntimeError("the backbone's weights or BatchNorm statistics changed during linear evaluation "
                           "(was it left in train mode?); the numbers are not valid")


# ---------------------------------------------------------------------------------------------
# Features, extracted once and cached
# ---------------------------------------------------------------------------------------------


def _loader(dataset, batch_size, num_workers, device, shuffle=False, generator=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       num_workers=num_workers, pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def _autocast(device, dtype):
    enabled = device.type == "cuda" and dtype != "float32"
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=enabled)


@torch.no_grad()
def extract_features(backbone, dataset, device, batch_size=256, num_workers=0, dtype="float32", label=""):
    """(features float32 (N, D) on the CPU, labels int64 (N,)), in data set order."""
    loader = _loader(dataset, batch_size, num_workers, device)
    progress = common.Progress(len(dataset), "img")
    every = max(1, len(loader) // 10)
    feats, labels, done = [], [], 0
    for i, (x, y) in enumerate(loader):
        with _autocast(device, dtype):
            f = backbone(x.to(device, non_blocking=True))
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
        done += len(y)
        if (i + 1) % every == 0 or done == len(dataset):
            print(f"features {label:<5s} " + progress.line(done), flush=True)
    return torch.cat(feats), torch.cat(labels).long()


def dataset_labels(dataset) -> torch.Tensor | None:
    """The labels a torchvision data set keeps in memory (targets or labels), without reading images."""
    for name in ("targets", "labels"):
        if getattr(dataset, name, None) is not None:
            return torch.as_tensor(list(getattr(dataset, name))).long()
    return None


def cache_path(out_dir: Path, backbone_hash: str, dataset: str, split: str, crop: int, dtype: str) -> Path:
    return out_dir / f"features_{dataset}_{split}_crop{crop}_{dtype}_{backbone_hash[:16]}.pt"


def cached_features(backbone, backbone_hash, dataset, name, split, crop, out_dir, device, args):
    """Features of one split from the cache if it matches, else extracted and cached atomically."""
    path = cache_path(out_dir, backbone_hash, name, split, crop, args.dtype)
    known = dataset_labels(dataset)
    if path.is_file():
        try:
            c = common.load_checkpoint(path)
            ok = c.get("backbone_sha256") == backbone_hash and (known is None or torch.equal(c["labels"], known))
        except (CheckpointError, KeyError):
            ok = False
        if ok:
            print(f"features {split:<5s} reusing {path}", flush=True)
            return c["features"], c["labels"]
        # Same key but other data (e.g. a different --data-dir): recompute, never mix.
        print(f"features {split:<5s} {path.name} does not match this data; recomputing", flush=True)
    x, y = extract_features(backbone, dataset, device, args.batch_size, args.num_workers, args.dtype, split)
    common.atomic_save(dict(features=x, labels=y, backbone_sha256=backbone_hash, dataset=name, split=split,
                            crop=crop, dtype=args.dtype), path)
    return x, y


# ---------------------------------------------------------------------------------------------
# The linear classifier on standardised features
# ---------------------------------------------------------------------------------------------


class Readout(nn.Module):
    """Standardise with fixed statistics, then a linear layer: what linear_classifier.pt holds."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, n_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        # A feature that never varies (std 0) carries no information: divide by 1, not by 0.
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)))
        self.linear = nn.Linear(len(mean), n_classes)

    def forward(self, f):
        return self.linear((f - self.mean) / self.std)


def lr_at(step: int, total: int, base: float) -> float:
    """Cosine decay from base to 0 over the run, no warm-up."""
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def fit_lbfgs(readout: Readout, x, y, wd, iters):
    """Full-batch L-BFGS from zero weights on the mean cross-entropy + 0.5 wd |W|^2."""
    nn.init.zeros_(readout.linear.weight)
    nn.init.zeros_(readout.linear.bias)
    z = (x - readout.mean) / readout.std  # standardised once, not at every iteration
    opt = torch.optim.LBFGS(readout.linear.parameters(), lr=1, max_iter=iters, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(readout.linear(z), y) + 0.5 * wd * readout.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return readout


def fit_sgd(mean, std, n_classes, batches, total_steps, settings, seed) -> list[Readout]:
    """Minibatch SGD (momentum 0.9, weight decay, cosine lr) from a small random start (std 0.01),
    as in SimSiam's linear evaluation, for every (lr, wd) in settings at once.

    The settings share each minibatch: their weights are stacked (K, classes, D) and stepped
    together, the update torch.optim.SGD makes (buf = 0.9 buf + g + wd w; w -= lr buf), written
    out because each setting has its own lr and wd. One pass over the batches instead of K keeps
    the sweep as cheap as a single fit (tests/test_linear_eval.py checks it against torch.optim.SGD).
    """
    K, D, device = len(settings), len(mean), mean.device
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(K, n_classes, D, generator=g) * 0.01).to(device).requires_grad_()
    b = torch.zeros(K, n_classes, device=device, requires_grad=True)
    lr = torch.tensor([lr for lr, _ in settings], device=device)
    wd = torch.tensor([wd for _, wd in settings], device=device)
    bufs = [torch.zeros_like(W), torch.zeros_like(b)]
    std = torch.where(std > 0, std, torch.ones_like(std))  # as in Readout
    for step, (x, y) in enumerate(batches):
        z = (x - mean) / std
        logits = torch.einsum("bd,kcd->kbc", z, W) + b[:, None, :]
        # Summed over settings, so each one gets the gradient of its own mean cross-entropy.
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(K), reduction="sum") / len(y)
        grads = torch.autograd.grad(loss, (W, b))
        scale = lr_at(step, total_steps, 1.0)
        with torch.no_grad():
            for p, grad, buf in zip((W, b), grads, bufs):
                shape = (K,) + (1,) * (p.dim() - 1)
                buf.mul_(0.9).add_(grad + wd.view(shape) * p)
                p.sub_(scale * lr.view(shape) * buf)
    readouts = []
    for k in range(K):
        r = Readout(mean, std, n_classes).to(device)
        with torch.no_grad():
            r.linear.weight.copy_(W[k])
            r.linear.bias.copy_(b[k])
        readouts.append(r)
    return readouts


def feature_batches(x, y, epochs, batch_size, seed):
    """Shuffled minibatches of the feature tensor, epoch after epoch (the cheap path)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g).to(x.device)
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]


def backbone_batches(backbone, dataset, device, epochs, batch_size, num_workers, dtype, seed):
    """Minibatches of features computed by the frozen backbone anew every epoch (--augment, and
    the uncached baseline of the benchmark). The backbone stays in eval mode and gets no gradient."""
    g = torch.Generator().manual_seed(seed)
    loader = _loader(dataset, batch_size, num_workers, device, shuffle=True, generator=g)
    for _ in range(epochs):
        for x, y in loader:
            with torch.no_grad(), _autocast(device, dtype):
                f = backbone(x.to(device, non_blocking=True))
            yield f.float(), torch.as_tensor(y).to(device, non_blocking=True)


def fit_readouts(x, y, n_classes, classifier, settings, args, batches=None, steps=None) -> list[Readout]:
    """One classifier per (lr, wd) in settings, on features standardised with x's own statistics.

    lbfgs fits on x; sgd trains on minibatches of x, or on `batches` (--augment) when given.
    """
    mean, std = x.mean(0), x.std(0)
    if classifier == "lbfgs":
        return [fit_lbfgs(Readout(mean, std, n_classes).to(x.device), x, y, wd, args.lbfgs_iters) for _, wd in settings]
    if batches is None:
        batches = feature_batches(x, y, args.epochs, args.batch_size, args.seed)
        steps = args.epochs * math.ceil(len(y) / args.batch_size)
    return fit_sgd(mean, std, n_classes, batches, steps, settings, args.seed)


def fit_readout(x, y, n_classes, classifier, lr, wd, args, batches=None, steps=None) -> Readout:
    return fit_readouts(x, y, n_classes, classifier, [(lr, wd)], args, batches, steps)[0]


def select_hyperparameters(x, y, n_classes, args) -> tuple[dict, list[dict]]:
    """The sweep, on the train split only: fit on (1 - val_fraction) of it, score on the rest.

    Returns the best setting (first one on ties, in the order of the grid) and every score.
    """
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y), generator=g).to(x.device)
    n_val = max(1, round(args.val_fraction * len(y)))
    val, fit = order[:n_val], order[n_val:]
    lrs = args.lrs if args.classifier == "sgd" else (None,)
    settings = [(lr, wd) for lr in lrs for wd in args.wds]
    table = []
    for (lr, wd), readout in zip(settings, fit_readouts(x[fit], y[fit], n_classes, args.classifier, settings, args)):
        with torch.no_grad():
            top1, = topk_accuracy(readout(x[val]), y[val], ks=(1,))
        table.append(dict(lr=lr, wd=wd, val_top1=top1))
    best = max(table, key=lambda r: r["val_top1"])  # max keeps the first of equal scores
    return best, table


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def augment_transform(crop: int):
    """The classic linear-eval views (SimSiam's main_lincls): random resized crop and flip."""
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(data.MEAN, data.STD)])


def print_table(result: dict) -> None:
    lin = result["offline_linear"]
    chosen = f"wd {lin['chosen']['wd']:g}" + (f", lr {lin['chosen']['lr']:g}"
                                              if lin["chosen"]["lr"] is not None else "")
    rows = [("offline_linear", lin["top1"], lin["top5"],
             f"{lin['classifier']}{' +augment' if lin['augment'] else ''}, {chosen} "
             f"(held-out train top-1 {100 * lin['chosen']['val_top1']:.1f})")]
    for name, r in result["knn"]["results"].items():
        rows.append((f"knn {name}", r["top1"], r["top5"], f"cosine, T = {result['knn']['temperature']:g}"))
    print(f"\n{result['dataset']} test split ({result['n_test']} images), backbone {result['checkpoint']}")
    print(f"{'evaluation':<16s} {'top-1':>7s} {'top-5':>7s}  settings")
    for name, t1, t5, note in rows:
        print(f"{name:<16s} {100 * t1:7.2f} {100 * t5:7.2f}  {note}")


def main(args: Args) -> dict:
    """Evaluate; an image that cannot be read (here or in a loader worker) is one `error:` line naming the file."""
    try:
        return evaluate(args)
    except DataError as e:
        die(str(e))


def evaluate(args: Args) -> dict:
    t_start = time.perf_counter()
    for bad, message in (
        (args.augment and args.classifier != "sgd",
         "--augment trains by minibatch SGD through the backbone: add --classifier sgd"),
        (not 0 < args.val_fraction < 1, f"--val-fraction must be between 0 and 1, got {args.val_fraction}"),
        (not args.wds or min(args.wds) < 0, f"--wds needs one or more weight decays >= 0, got {args.wds}"),
        (args.classifier == "sgd" and (not args.lrs or min(args.lrs) <= 0),
         f"--lrs needs one or more rates > 0, got {args.lrs}"),
        (args.epochs < 1 or args.lbfgs_iters < 1 or args.batch_size < 1,
         "--epochs, --lbfgs-iters and --batch-size must be >= 1"),
        (min(args.knn_k, default=1) < 1 or args.knn_temperature <= 0, "--knn-k must be >= 1 and --knn-temperature > 0"),
    ):
        if bad:
            die(message)
    device = common.pick_device(args.device)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    checkpoint = Path(args.checkpoint)
    out_dir = Path(args.out_dir) if args.out_dir else checkpoint.parent
    trained = checkpoint.parent / "backbone.json"  # what the training scripts write beside backbone.pt and last.pt
    crop = (args.crop or (json.loads(trained.read_text()).get("crop") if trained.is_file() else None)
            or CROP_SIZE[args.dataset])
    if args.dataset != "imagefolder" and crop > CROP_SIZE[args.dataset]:
        die(f"--crop {crop} is larger than the {CROP_SIZE[args.dataset]}x{CROP_SIZE[args.dataset]} images "
            f"of {args.dataset}")

    # Everything that can fail on bad input fails here, before anything is written.
    try:
        backbone, info = load_backbone(checkpoint)
    except CheckpointError as e:
        die(str(e))
    try:
        transform = data.eval_transform(args.dataset, crop)
        train_set = data.load_dataset(args.dataset, args.data_dir, "train", transform, args.download)
        test_set = data.load_dataset(args.dataset, args.data_dir, "test", transform, args.download)
    except DataError as e:
        die(str(e))
    n_classes = len(train_set.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"backbone: ResNet-18 width {info['width']:g}, {'small' if info['small_stem'] else 'ImageNet'} stem, "
          f"{info['out_dim']} features, from {checkpoint} {info['found_at']}; device {device}", flush=True)

    backbone = freeze(backbone.to(device))
    reference = state_hash(backbone)
    t0 = time.perf_counter()
    train_x, train_y = cached_features(backbone, reference, train_set, args.dataset, "train", crop, out_dir, device,
                                       args)
    test_x, test_y = cached_features(backbone, reference, test_set, args.dataset, "test", crop, out_dir, device, args)
    t_features = time.perf_counter() - t0
    train_x, train_y, test_x, test_y = (t.to(device) for t in (train_x, train_y, test_x, test_y))

    # offline_linear: sweep on the train split, refit on all of it, report on the test split.
    t0 = time.perf_counter()
    best, sweep = select_hyperparameters(train_x, train_y, n_classes, args)
    if args.augment:
        aug_set = data.load_dataset(args.dataset, args.data_dir, "train", augment_transform(crop), args.download)
        steps = args.epochs * math.ceil(len(aug_set) / args.batch_size)
        batches = backbone_batches(backbone, aug_set, device, args.epochs, args.batch_size, args.num_workers,
                                   args.dtype, args.seed)
        readout = fit_readout(train_x, train_y, n_classes, "sgd", best["lr"], best["wd"], args, batches, steps)
    else:
        readout = fit_readout(train_x, train_y, n_classes, args.classifier, best["lr"], best["wd"], args)
    with torch.no_grad():
        top1, top5 = topk_accuracy(readout(test_x), test_y)
        train_top1, = topk_accuracy(readout(train_x), train_y, ks=(1,))
    t_linear = time.perf_counter() - t0

    t0 = time.perf_counter()
    knn = {}
    for k in args.knn_k:
        scores = knn_scores(train_x, train_y, test_x, n_classes, k, args.knn_temperature)
        k1, k5 = topk_accuracy(scores, test_y)
        knn[f"k={k}"] = dict(top1=k1, top5=k5)
    t_knn = time.perf_counter() - t0

    try:
        check_unchanged(backbone, reference)
    except RuntimeError as e:
        die(str(e))

    result = dict(
        checkpoint=str(checkpoint), dataset=args.dataset, data_dir=args.data_dir, crop=crop,
        n_train=len(train_y), n_test=len(test_y), n_classes=n_classes,
        backbone=dict(info, sha256=reference, frozen="eval mode, requires_grad False, unchanged after evaluation"),
        offline_linear=dict(top1=top1, top5=top5, train_top1=train_top1, classifier=args.classifier,
                            augment=args.augment, chosen=best, sweep=sweep,
                            protocol="linear classifier on frozen backbone features, standardised; "
                                     "hyper-parameters chosen on a held-out part of the train split, "
                                     "refit on the full train split, scored on the test split"),
        knn=dict(results=knn, similarity="cosine", temperature=args.knn_temperature,
                 votes="exp(similarity / temperature) summed per class over the k nearest train images"),
        settings=asdict(args), device=str(device), torch=torch.__version__,
        seconds=dict(features=t_features, offline_linear=t_linear, knn=t_knn, total=time.perf_counter() - t_start),
    )
    common.atomic_save(dict(readout=readout.state_dict(), n_classes=n_classes, backbone_sha256=reference),
                       out_dir / "linear_classifier.pt")
    common.atomic_write_text(out_dir / "linear_eval.json", json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out_dir / 'linear_eval.json'}")
    return result


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
