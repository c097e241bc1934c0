"""The shared core: the paper's math first, then the backbone, then the plumbing every script uses.

Map to the paper (Halvagal, Laborieux & Zenke, "Implicit variance regularization in
non-contrastive SSL", NeurIPS 2023) and to METHOD.md (the equations, numbered by section):

  cosine_loss, euclidean_loss         (3.1), (3.2): L_cos = 2 - 2 cos(p, t), L_euc = |p - t|^2
  iso_euclidean_loss, iso_cosine_loss (3.3), (3.4): IsoLoss, the same gradient with W_P^T removed
  MLPPredictor, LinearPredictor       (2.1), (2.2): BYOL/SimSiam predictor; learnable W (Fig. 4)
  correlation_batch, ClosedFormPredictor  (2.3a-d): C <- tau_c C + (1 - tau_c) Z^T Z / B, eigh,
                                      W_P = U diag(s_hat^a) U^T
  pair_loss                           (1.1): one view order's loss; the step sums both orders
  participation_ratio, normalized_std, eigenvector_alignment, centred_spectrum, effective_rank,
  mode_gradients, knn_scores, topk_accuracy  what the runs log (section 6), how collapse is told from health
  resnet18                            the backbone, with torchvision's parameter names
  LARS                                the optimiser of the runs with an EMA target (section 6), as the release's
  pick_device, cpu_info, atomic_save, load_checkpoint, Progress, die: plumbing every script needs

Conventions: a batch is (B, d); every loss is a per-sample loss averaged over the batch; the
target t is detached inside the loss (stop-gradient), except where `stop_grad=False` asks for
the no-stop-gradient ablation. Eigenvalues are in ascending order, as torch.linalg.eigh gives them.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- Losses (METHOD.md section 3) -----------------------------------------------------------------


def cosine_loss(p: torch.Tensor, t: torch.Tensor, stop_grad: bool = True) -> torch.Tensor:
    """2 - 2 cos(p, t), averaged over the batch; t is detached unless stop_grad=False."""
    if stop_grad:
        t = t.detach()
    return (2 - 2 * (F.normalize(p, dim=-1) * F.normalize(t, dim=-1)).sum(-1)).mean()


def euclidean_loss(p: torch.Tensor, t: torch.Tensor, stop_grad: bool = True) -> torch.Tensor:
    """|p - t|^2 (summed over features), averaged over the batch; t detached unless asked."""
    if stop_grad:
        t = t.detach()
    return (p - t).pow(2).sum(-1).mean()


def iso_euclidean_loss(z: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """IsoLoss, Euclidean: |z - sg(t + z - p)|^2. Its value is |p - t|^2, but the gradient reaches z
    directly, as 2 (p - t), not as 2 W_P^T (p - t): every eigenmode learns at the same speed."""
    return (z - (t + z - p).detach()).pow(2).sum(-1).mean()


def iso_cosine_loss(z: torch.Tensor, p: torch.Tensor, p_sqrt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """IsoLoss, cosine: -2 [ z.t / sg(|p||t|) - 1/2 sg(p.t / (|p|^3 |t|)) |p_sqrt|^2 ]. With p = W_P z and
    p_sqrt = W_P^(1/2) z, d|p_sqrt|^2/dz = 2 p and the gradient is -2 [t / (|p||t|) - (p.t) p / (|p|^3 |t|)]:
    the cosine gradient with W_P^T removed. The value is not a similarity; log cosine_loss(p, t) beside it."""
    t = t.detach()
    p_norm = p.norm(dim=-1).clamp_min(1e-12)
    t_norm = t.norm(dim=-1).clamp_min(1e-12)
    attract = (z * t).sum(-1) / (p_norm * t_norm).detach()
    scale = ((p * t).sum(-1) / (p_norm.pow(3) * t_norm)).detach()
    return (-2 * (attract - 0.5 * scale * p_sqrt.pow(2).sum(-1))).mean()


# --- Predictors (METHOD.md section 2) -------------------------------------------------------------


class MLPPredictor(nn.Sequential):
    """BYOL/SimSiam predictor: Linear(d, h) - BatchNorm1d(h) - ReLU - Linear(h, d)."""

    def __init__(self, dim: int = 256, hidden: int = 4096):
        super().__init__(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class LinearPredictor(nn.Linear):
    """A learnable d x d matrix W without bias: p = W z (its eigenvectors are Fig. 4's subject)."""

    def __init__(self, dim: int = 256):
        super().__init__(dim, dim, bias=False)


# DirectPred and DirectCopy as in the authors' released config: the one place of their spectra. The
# running C's decay tau_c is a training setting (Args.tau_c: 0.998 with the EMA target, 0.5 without).
CLOSED_FORM = {"directpred": dict(alpha=0.5, eps=0.0), "directcopy": dict(alpha=1.0, eps=0.25)}


@torch.no_grad()
def correlation_batch(z: torch.Tensor) -> torch.Tensor:
    """Z^T Z / B in float64 (not centred), averaged over ranks under torch.distributed: the batch
    term of the running correlation matrix C, the same on every rank."""
    z = z.detach().to(torch.float64)
    batch = z.T @ z / z.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch)
        batch /= dist.get_world_size()
    return batch


class ClosedFormPredictor(nn.Module):
    """W_P = U diag(s_hat^alpha) U^T from a running correlation matrix C of the online outputs.

    update(z) folds a detached batch into C <- decay C + (1 - decay) Z^T Z / B (not centred; decay is the
    paper's tau_c, --tau-c of the training scripts), then eigendecomposes C once (eigh, float64) and caches W_P
    and W_P^(1/2); calling the module returns p = W_P z, and apply_sqrt(z) returns W_P^(1/2) z. W_P is a
    constant for autograd. The training scripts update once per view, each view predicted right after its own
    update (the release's order).
    normalize=True (the release's default) divides the eigenvalues by the largest: W_P's scale is fixed
    (its top eigenvalue is 1) whatever the size of z. normalize=False keeps s itself, the toy theory's
    W_P (METHOD.md 4): the Euclidean loss then pins every mode's variance at 1 instead of leaving the
    scale of z free.
    Edge cases, by design: before the first update, and whenever C is all zeros, W_P = I (s / max(s)
    is undefined there); with eps = 0 the null directions of C get 0 in W_P; round-off negative
    eigenvalues are clipped at 0; NaN or Inf in z raise FloatingPointError before C is touched.
    Under torch.distributed the batch term is averaged over ranks first: every rank holds the same C.
    """

    def __init__(self, dim: int, alpha: float, eps: float, decay: float, normalize: bool = True):
        super().__init__()
        if alpha <= 0 or eps < 0 or not 0 <= decay < 1:
            raise ValueError("ClosedFormPredictor needs alpha > 0, eps >= 0, 0 <= decay < 1; "
                             f"got {alpha=}, {eps=}, {decay=}")
        # decay is a plain attribute, not a buffer: it is not in the state_dict (checkpoints hold the settings).
        self.alpha, self.eps, self.decay, self.normalize = alpha, eps, decay, normalize
        self.register_buffer("C", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("eigvals", torch.zeros(dim, dtype=torch.float64))
        # Kept in float64 (they are tiny) and cast to the input's dtype in forward.
        self.register_buffer("W", torch.eye(dim, dtype=torch.float64))
        self.register_buffer("W_sqrt", torch.eye(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        batch = correlation_batch(z)
        # One host sync per update (per view); eigh below synchronises on CUDA anyway. Checked after the
        # all-reduce so that every rank raises together instead of one rank hanging.
        if not torch.isfinite(batch).all():
            raise FloatingPointError("ClosedFormPredictor.update: the projector outputs contain NaN or Inf; "
                                     "C was left unchanged")
        self.C.mul_(self.decay).add_(batch, alpha=1 - self.decay)
        s, U = torch.linalg.eigh(self.C)
        self.eigvals.copy_(s)
        s_max = s.max()
        # torch.where instead of `if s_max > 0` keeps this free of another host sync.
        scale = s_max if self.normalize else torch.ones_like(s_max)
        s_hat = torch.where(s_max > 0, s.clamp_min(0) / scale, torch.ones_like(s)) + self.eps
        # New tensors, not copies into the old ones: the previous view's graph may still hold W (in float64
        # forward uses W itself), and an in-place write would corrupt that view's backward.
        self.W = (U * s_hat.pow(self.alpha)) @ U.T
        self.W_sqrt = (U * s_hat.pow(self.alpha / 2)) @ U.T

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # W_P is symmetric, so z @ W_P is (W_P z^T)^T row by row.
        return z @ self.W.to(z.dtype)

    def apply_sqrt(self, z: torch.Tensor) -> torch.Tensor:
        """W_P^(1/2) z, which the cosine IsoLoss needs beside p = W_P z."""
        return z @ self.W_sqrt.to(z.dtype)

    def extra_repr(self) -> str:
        return (f"dim={self.C.shape[0]}, alpha={self.alpha}, eps={self.eps}, decay={self.decay}, "
                f"normalize={self.normalize}")


def build_predictor(kind: str, dim: int, hidden: int, decay: float, alpha: float | None = None,
                    eps: float | None = None, normalize: bool = True) -> nn.Module:
    """mlp, linear, directpred, directcopy (alpha/eps default to CLOSED_FORM's) or none (the ablation);
    decay, normalize: the running C's decay (tau_c) and whether W_P's spectrum is divided by its largest value
    (closed-form predictors only)."""
    if kind in CLOSED_FORM:
        spec = CLOSED_FORM[kind]
        return ClosedFormPredictor(dim, spec["alpha"] if alpha is None else alpha,
                                   spec["eps"] if eps is None else eps, decay, normalize)
    others = {"mlp": lambda: MLPPredictor(dim, hidden), "linear": lambda: LinearPredictor(dim), "none": nn.Identity}
    if kind not in others:
        raise ValueError(f"unknown predictor {kind!r}; choose one of {', '.join([*others, *CLOSED_FORM])}")
    return others[kind]()


def check_isoloss(predictor: nn.Module) -> None:
    """IsoLoss is only defined for a closed-form predictor: raise a ValueError that says why."""
    if not isinstance(predictor, ClosedFormPredictor):
        raise ValueError("IsoLoss needs a closed-form predictor (directpred or directcopy): it removes the factor "
                         f"W_P^T from the gradient, which needs a symmetric linear W_P; got {type(predictor).__name__}")


def pair_loss(loss: str, isoloss: bool, predictor: nn.Module, z: torch.Tensor, t: torch.Tensor,
              stop_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one view order: the prediction of z toward the target t. Returns (loss to minimise,
    cosine loss of the same pair, detached, for logging: the runs log it beside every loss). The training step
    sums the two orders (p1 toward t2, p2 toward t1: summed, not averaged). A ClosedFormPredictor predicts with
    the W_P it holds now: update it with this view first."""
    p = predictor(z)
    if isoloss:
        check_isoloss(predictor)
        if not stop_grad:
            raise ValueError("IsoLoss is built from stop-gradients; it has no no-stop-gradient variant")
        value = iso_cosine_loss(z, p, predictor.apply_sqrt(z), t) if loss == "cosine" else iso_euclidean_loss(z, p, t)
    else:
        value = (cosine_loss if loss == "cosine" else euclidean_loss)(p, t, stop_grad=stop_grad)
    return value, cosine_loss(p.detach(), t)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least, for the loss and the readout: autocast's half-precision outputs are cast to float32,
    float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --- Metrics: what the deep runs log (METHOD.md section 6), and how collapse is told from health ---


def participation_ratio(s: torch.Tensor) -> float:
    """(sum s)^2 / sum s^2: the effective number of dimensions a spectrum uses (1 to len(s))."""
    s = s.double().clamp_min(0)
    return float(s.sum() ** 2 / s.pow(2).sum().clamp_min(1e-300))


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Std over the batch of l2-normalised outputs, averaged over features.

    Collapse indicator: about 1/sqrt(d) for healthy, spread-out outputs, 0 when collapsed.
    Returned as a tensor so callers decide when to synchronise.
    """
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def eigenvector_alignment(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """For each eigenvector u of C (ascending eigenvalue), cos(u, W u); all ones when W shares C's eigenbasis."""
    _, U = torch.linalg.eigh(C.double())
    WU = W.double() @ U
    return (U * WU).sum(0) / WU.norm(dim=0).clamp_min(1e-300)


@torch.no_grad()
def centred_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, float64) of the covariance of the rows of x, the mean removed: unlike the
    uncentred C, a large mean of x cannot hide how many directions the rest spreads over."""
    x = x.double() - x.double().mean(0)
    return torch.linalg.eigvalsh(x.T @ x / max(1, len(x) - 1)).clamp_min(0)


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values, here
    sqrt of the covariance eigenvalues; 1 for a single direction, d for d equal ones."""
    s = eigenvalues.double().clamp_min(0).sqrt()
    p = s / s.sum().clamp_min(1e-300) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def knn_scores(train_x, train_y, test_x, n_classes, k, temperature=0.07, chunk=1024) -> torch.Tensor:
    """Class votes (N_test, n_classes): the k most cosine-similar train points each vote for their
    class with weight exp(similarity / temperature)."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    out = []
    for i in range(0, len(test_x), chunk):
        s, idx = (F.normalize(test_x[i:i + chunk].float(), dim=1) @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(s), n_classes, device=s.device, dtype=s.dtype)
        out.append(votes.scatter_add_(1, train_y[idx], (s / temperature).exp()))
    return torch.cat(out)


def probe_scores(train_x, train_y, test_x, n_classes, ridge: float = 0.01) -> torch.Tensor:
    """Class scores (N_test, n_classes) of a linear probe fitted in closed form: ridge regression onto one-hot
    labels of the features standardised with the train points' mean and std (float64). Unlike cosine k-NN, a
    large shared mean or a few dominant directions of the raw features do not decide it; ridge (times N) keeps
    it defined when the features span few directions."""
    x = train_x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    y = F.one_hot(train_y, n_classes).double()
    w = torch.linalg.solve(x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device), x.T @ y)
    test = (test_x.double() - mean) / std
    return torch.cat([test, torch.ones(len(test), 1, dtype=test.dtype, device=test.device)], 1) @ w


def mode_gradients(predictor: ClosedFormPredictor, loss: str, z: torch.Tensor, t: torch.Tensor) -> dict:
    """What the theory is about, measured in a deep run: the gradient that reaches z (one view order),
    per eigenvector of C (ascending eigenvalue), as the RMS over the batch of the per-sample gradient,
    for the standard loss (through W_P^T) and for IsoLoss (without it), at the same z and t; and the
    mean cosine between the descent direction and z, > 0 where a step lengthens z."""
    U, out = torch.linalg.eigh(predictor.C)[1], {}
    for name in ("standard", "iso"):
        zz = z.detach().double().requires_grad_()
        value, _ = pair_loss(loss, name == "iso", predictor, zz, t.detach().double())
        g = torch.autograd.grad(value, zz)[0] * len(zz)
        out[f"grad_modes_{name}"] = (g @ U).square().mean(0).sqrt().tolist()
        out[f"grad_radial_{name}"] = float(F.cosine_similarity(-g, zz.detach(), dim=1).mean())
    return out


def topk_accuracy(scores: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Fraction of rows whose label is among the k highest scores (k capped at the class count)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == y.view(-1, 1)
    return [hit[:, :k].any(1).double().mean().item() for k in ks]


# --- The backbone, shared by the training scripts and linear_eval.py (METHOD.md section 6) --------


class BasicBlock(nn.Module):
    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or inp != out:
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18 with torchvision's parameter names: at width 1 its state_dict loads strictly into
    torchvision.models.resnet18() after the same stem change and fc = Identity. small_stem (the release's
    CIFAR stem, for crops of 32 pixels or less): first conv 3x3, stride 1, padding 2, PyTorch's default
    init, no max-pool; larger crops keep torchvision's 7x7 stem and max-pool, as the release does.
    width scales the channels (64, 128, 256, 512) for CPU trials; out_dim = 512 * width is the feature size."""

    def __init__(self, width: float = 1.0, small_stem: bool = True):
        super().__init__()
        c = [max(1, round(k * width)) for k in (64, 128, 256, 512)]
        # The release's CIFAR stem: 3x3, stride 1, padding 2 (a 32-pixel image gives 34x34 maps).
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 2, bias=False) if small_stem else nn.Conv2d(3, c[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        inp = c[0]
        for i, (out, stride) in enumerate(zip(c, (1, 2, 2, 2))):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inp, out, stride), BasicBlock(out, out, 1)))
            inp = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.out_dim = c[3]
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if small_stem:  # the release swaps in a new conv1 after torchvision's init: it keeps PyTorch's default
            self.conv1.reset_parameters()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18(width: float = 1.0, small_stem: bool = True) -> ResNet18:
    return ResNet18(width, small_stem)


def uses_small_stem(crop: int) -> bool:
    """The release uses its small stem for CIFAR's 32 pixels only; TinyImageNet's 64 keep torchvision's."""
    return crop <= 32


# --- The optimiser of the runs with an EMA target (METHOD.md section 6) ---------------------------


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017), the optimiser of the runs with an EMA target: the release trains BYOL, DirectPred,
    DirectCopy and IsoLoss with the EMA target by it (train_byol.py's make_optimizer builds its groups; the runs
    without a target use plain momentum SGD). METHOD.md section 6.

    Momentum SGD whose step for each weight tensor is scaled by the trust ratio eta |w| / (|g| + wd |w| + 1e-8),
    clipped so that the adapted rate never exceeds the global one; where |w| or |g| is zero, the plain gradient
    (no decay), as in the release. Groups with lars=False (biases, norm layers) get plain momentum SGD."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                g, wd = p.grad, group["weight_decay"]
                if group["lars"]:
                    w_norm, g_norm = p.norm(), g.norm()
                    trust = group["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8)
                    # torch.where instead of an `if` on the norms: no host synchronisation.
                    g = torch.where((w_norm > 0) & (g_norm > 0), (g + wd * p) * (trust / group["lr"]).clamp(max=1.0), g)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])


# --- Plumbing --------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def loader_workers() -> int:
    """Data-loading processes for one rank: the cores this process may use (its CPU affinity, which grid.py sets per
    run), shared by the ranks on this machine (torchrun's LOCAL_WORLD_SIZE), less the one the rank itself runs on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(16, max(0, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def cpu_info() -> tuple[str, set[str]]:
    """This machine's CPU, for labelling what was measured on it (machines differ): "model, N cores,
    vector extensions, bf16", and its /proc/cpuinfo flags (empty where there is no such file)."""
    model, flags = platform.processor() or platform.machine(), set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    ext = "/".join(n for n, f in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AMX", "amx_tile"))
                   if f in flags) or "no AVX2"
    bf16 = "native bf16" if flags & {"avx512_bf16", "amx_bf16"} else "no native bf16"
    return f"{model}, {os.cpu_count()} cores, {ext}, {bf16}", flags


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file, the fault, and what to do."""


def _atomic_write(path: str | Path, write, mode: str) -> None:
    """write(file) into a temporary file in the same folder, fsync, then rename over path: a kill
    at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str | Path) -> None:
    """torch.save, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path: str | Path, text: str) -> None:
    """A text file (JSON, metrics), atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: f.write(text), "w")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True; any failure becomes one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read ({first}); it is truncated, corrupt or not a "
                              "checkpoint of this repository: move it away or point to another file") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict of this repository")
    return obj


class Progress:
    """Fixed-width progress lines with rate and ETA: `p = Progress(total, "img"); p.line(done, loss=..)`."""

    def __init__(self, total: int, unit: str = "it", start: int = 0):
        self.total, self.unit, self.start_done, self.t0 = total, unit, start, time.perf_counter()

    def line(self, done: int, **fields) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else math.inf
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        hms = (f"{int(eta) // 3600:02d}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}"
               if math.isfinite(eta) else "--:--:--")
        return f"{done:>8d}/{self.total:<8d} {extra}  {rate:8.1f} {self.unit}/s  ETA {hms}"


def die(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit: how the scripts report bad input."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
