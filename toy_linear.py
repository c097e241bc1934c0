"""The toy Siamese network of "Implicit variance regularization in non-contrastive SSL"
(Halvagal, Laborieux, Zenke, NeurIPS 2023): Figs. 2, 5 and 6, with the eigenmode theory drawn
over the simulation.

Reproduce the paper's toy figures (Figs. 2, 5, 6, summary.json; about half a minute on a
2-core CPU, over half of it the 100,000-step no-predictor runs; results/bench/README.md has the measured time):
    python toy_linear.py
Only some figures or settings, noise on both views, the notebook's 50,000 samples per step:
    python toy_linear.py --figures fig2 --settings euclidean-standard euclidean-isoloss
    python toy_linear.py --noise-both-views
    python toy_linear.py --samples 50000 --no-exact      # slow: the notebook's own budget
Output (default runs/toy_linear/): fig2_trajectories.png, fig2_eigenvalues.png, fig5.png,
fig6_trajectories.png, fig6_eigenvalues.png, one .npz of raw trajectories per figure block,
summary.json; a table of the same numbers is printed at the end.

The model (METHOD.md sections 4 and 5): z = W x (or relu(W x)), x ~ N(0, I_N); the online view is x,
the target view x + sigma * noise; the predictor W_P = U diag(lambda^alpha) U^T is computed in
closed form from W W^T = U diag(lambda) U^T and is a constant for the gradient; the target is
t = W x_2 (same weights, as in SimSiam). W follows plain gradient descent on the expected loss,
Euclidean 1/2 ||p - t||^2 or cosine -cos(p, t), in eight settings:
    {euclidean, cosine} x {standard, no-stopgrad, no-predictor, isoloss}.
IsoLoss removes the factor W_P^T from the gradient with respect to z (see METHOD.md section 3).

Exact expectation vs Monte Carlo:
  * linear Euclidean settings (all four): the expected gradient is a closed-form matrix
    polynomial in W (Gaussian inputs only enter through their covariances), so these runs use
    it exactly: no sampling noise, and the no-predictor run does not move at all.
  * cosine settings and everything with ReLU: no closed form, so each step draws `--samples`
    fresh inputs (shared by all runs of a simulation; Figs. 2 and 6 share theirs) and averages
    the exact per-sample gradients.
    Each input is used twice, with +noise and -noise (antithetic pairs): the part of the
    gradient linear in the noise averages to zero and cancels exactly within a pair, which makes
    2,048 samples give the notebook's curves (50,000 samples) within line width, and 256 enough
    for the slow drift of the 100,000-step no-predictor runs (checked against 1,024 and 4,096).
    Samples and the weights of these runs are float32 (their sampling error dwarfs rounding);
    the exact runs and all eigendecompositions are float64.

Theory (dashed lines on every linear eigenvalue panel): each mode's eigenvalue evolves on its own,
lambda_m <- (1 - eta g_m)^2 lambda_m per step, where g_m is the gradient's eigenvalue in that
mode (METHOD.md section 4 writes the same as the flow d lambda_m/dn = -2 eta g_m lambda_m). For the
Euclidean loss this is exact; for the cosine loss it is the mean-field approximation (norms and
dot products replaced by their expectations). The largest relative deviation between simulation
and theory is reported per run.

What the default run shows (linear, N = 15, M = 10, 1500 steps), theory against simulation:
  * Euclidean: simulation = theory (deviation < 1e-9). Standard: nine modes at 1, the smallest
    still at 0.048; IsoLoss: all ten at 1; no stop-gradient: collapse; no predictor: frozen.
  * Cosine, mean field: right end points (isotropic; IsoLoss 1.057 in both), wrong time course:
    it recruits the smallest mode of the standard run far too slowly (0.10 vs 0.59 at step 1500).
  * The trace of W W^T is conserved by the cosine standard, no-stopgrad and no-predictor
    gradients (up to the growth of finite steps), but not by the cosine IsoLoss gradient, which
    is not orthogonal to W: its trace grows from 7.88 to 10.57.
  * Cosine ablations, where the theory has no answer: without stop-gradient W W^T collapses onto
    two modes (near 3.9 and 4.05; mean field: one mode); without predictor mean field predicts no
    motion, but the spectrum slowly evens out (0.60 to 0.87 after 100,000 steps).
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SettingName = Literal[
    "euclidean-standard", "euclidean-no-stopgrad", "euclidean-no-predictor", "euclidean-isoloss",
    "cosine-standard", "cosine-no-stopgrad", "cosine-no-predictor", "cosine-isoloss",
]
SETTINGS = SettingName.__args__
VARIANTS = ("no-stopgrad", "no-predictor", "standard", "isoloss")  # the paper's column order


@dataclass
class Args:
    out_dir: str = "runs/toy_linear"
    """directory for the figures, the .npz trajectories and summary.json"""
    seed: int = 2
    """torch.manual_seed before drawing W0 = randn(M, N) / 4 (2 is the authors' notebook)"""
    figures: tuple[Literal["fig2", "fig5", "fig6"], ...] = ("fig2", "fig5", "fig6")
    """which figures to make: fig2 (linear), fig5 (three initialisations), fig6 (fig2 with ReLU)"""
    settings: tuple[SettingName, ...] = SETTINGS
    """settings in the 2 x 4 grids of Figs. 2 and 6 (Fig. 5 always uses the two standard ones)"""
    activation: Literal["default", "linear", "relu"] = "default"
    """force one activation everywhere (default: Figs. 2 and 5 linear, Fig. 6 ReLU)"""
    steps: int = 1500
    """gradient steps of every run except the no-predictor eigenvalue runs"""
    no_predictor_steps: int = 100_000
    """gradient steps of the no-predictor runs in the eigenvalue panels"""
    lr: float = 0.01
    """learning rate of the N = 6 runs (trajectories, Fig. 5) and the Euclidean eigenvalue runs"""
    lr_fast: float = 0.1
    """learning rate of the cosine and euclidean-no-predictor eigenvalue runs"""
    samples: int = 2048
    """fresh Gaussian inputs per step in the Monte Carlo runs (the notebook draws 50,000)"""
    samples_long: int = 256
    """fresh Gaussian inputs per step in the long no-predictor runs"""
    exact: bool = True
    """closed-form expected gradient in the linear Euclidean settings (--no-exact samples them)"""
    sigma: float = 0.1
    """standard deviation of the input noise of the target view"""
    noise_both_views: bool = False
    """add independent noise of the same size to the online view too"""
    alpha: float = 1.0
    """predictor exponent: W_P = U diag(lambda^alpha) U^T"""
    plots: bool = True
    """draw the PNG figures (--no-plots writes only .npz and summary.json)"""


# ---------------------------------------------------------------- the model and its gradients

def parse(name):
    """Setting name -> (cosine, predictor, isoloss, stopgrad) flags."""
    loss, variant = name.split("-", 1)
    return (loss == "cosine", variant != "no-predictor", variant == "isoloss",
            variant != "no-stopgrad")


def flags(names):
    """Per-run flags as (S, 1, 1) float tensors, so that one code path serves all settings."""
    cols = torch.tensor([parse(n) for n in names], dtype=torch.float64).T
    return [c.view(-1, 1, 1) for c in cols]


def predictor(W, uses_predictor, alpha):
    """Closed-form predictor from W W^T, and the eigenvalues of W W^T (ascending), in float64."""
    lam, U = torch.linalg.eigh(W @ W.mT)
    lam = lam.clamp(min=0)  # rounding can make an eigenvalue of a collapsed mode slightly negative
    WP = (U * (lam**alpha).unsqueeze(-2)) @ U.mT
    return torch.where(uses_predictor > 0, WP, torch.eye(W.shape[1], dtype=W.dtype)), lam


def expected_grad(W, WP, f, sigma, both):
    """E[dL/dW] of the linear Euclidean loss 1/2 ||p - t||^2, in closed form: K W, see below."""
    return expected_grad_matrix(WP, f, sigma, both) @ W


def expected_grad_matrix(WP, f, sigma, both):
    """K with E[dL/dW] = K W for the linear Euclidean loss; K depends on W only through W_P.

    With x1 = x (+ noise), x2 = x + noise: E[x1 x1^T] = a I, E[x2 x1^T] = I, E[x2 x2^T] = b I, so
    online branch: Q (a W_P - I) W with Q = W_P (standard) or I (IsoLoss drops W_P^T);
    target branch (only without stop-gradient): (b I - W_P) W.
    """
    cosine, _, iso, stopgrad = f
    a, b = 1 + both * sigma**2, 1 + sigma**2
    eye = torch.eye(WP.shape[-1], dtype=WP.dtype)
    Q = iso * eye + (1 - iso) * WP
    return Q @ (a * WP - eye) + (1 - stopgrad) * (b * eye - WP)


def sampled_grad(W, WP, x1, x2, cosine, iso, no_sg, relu):
    """Average over the samples of the exact per-sample gradient dL/dW, for S runs at once.

    W (S, M, N); WP (S, M, M), or None when no run has a predictor; x1, x2 (B, N): the online
    and the target inputs, shared by all runs; cosine, relu: one bool for all runs of the call,
    or (S, 1) bool tensors, one flag per run; iso: (S, 1) flags, 1 for IsoLoss; no_sg: (S, 1)
    flags, 1 where the gradient also flows through the target, or None.
    """
    grad = grad_fn(cosine, iso, no_sg, relu, W.dtype, online_views=1, target_views=1)
    return grad(W, WP, torch.cat([x1, x2])) / x1.shape[0]


def grad_fn(cosine, iso, no_sg, relu, dtype, online_views, target_views):
    """sampled_grad as a function grad(W, WP, x) of the weights and the inputs alone, returning
    the sum over the samples, not the mean. The flags of sampled_grad become tensors here, once,
    not at every step: a small torch operation costs microseconds, as much as the arithmetic of a
    256-sample step.

    x stacks the online inputs, online_views x n rows, on the target inputs, target_views x n
    rows. With one online view its row i pairs with the target rows i, n + i, ...: simulate
    passes the clean x once and x + noise, x - noise, so W x is computed once for both members
    of an antithetic pair, whose gradients are added before the product with W_P and the ReLU
    mask. With as many online as target views, row v n + i pairs with row v n + i.
    The samples run along the last axis, (S, M, view, n): the sums over the M outputs then add
    whole rows (summing an innermost axis of 2 or 10 elements is ten times slower), and W_P
    applies as a batched (M, M) @ (M, samples) product.
    """
    def run_flag(v):  # (S, 1) flags -> (S, 1, 1, 1) tensors of dtype
        return v.view(-1, 1, 1, 1).to(dtype)

    # ReLU is max(h, 0) and the identity max(h, -inf): one per-run floor serves both at once
    floor = (None if relu is False else torch.zeros(1, 1, 1, 1, dtype=dtype) if relu is True
             else torch.where(run_flag(relu) > 0, 0.0, -torch.inf).to(dtype))
    if isinstance(cosine, torch.Tensor):  # per-run losses: each coefficient is cosine's or 1
        cos_w = run_flag(cosine)
        euc_w = 1 - cos_w
    iso = iso.view(-1, 1, 1).to(dtype)
    # the runs without stop-gradient, whose target branch contributes too: a slice (views, not
    # copies) when they are adjacent, as simulate orders them, else an index
    nsg = None
    if no_sg is not None and no_sg.any():
        ids = no_sg.flatten().nonzero().flatten()
        nsg = slice(int(ids[0]), int(ids[-1]) + 1) if ids[-1] - ids[0] + 1 == len(ids) else ids
    views = [online_views, target_views]

    def grad(W, WP, x):
        S, M, N = W.shape
        n = x.shape[0] // (online_views + target_views)
        # in place where possible: at 2048 samples the arrays outgrow the cache, and memory
        # traffic, not arithmetic, sets the pace
        zt = torch.mm(W.view(S * M, N), x.T).view(S, M, -1, n)
        if floor is not None:
            zt = zt.clamp_(min=floor)
        z, t = zt.split_with_sizes(views, 2)
        if floor is not None:  # z > floor as 0/1 floats: a bool mask multiplies 3x slower
            mask = torch.sub(z, floor).sign_()
        p = z
        if WP is not None:  # p = W_P z (W_P symmetric) replaces z: [p | t] stays one array
            p = z.copy_((WP @ z.reshape(S, M, -1)).view(z.shape))
        # dL/dp = a p - b t and dL/dt = c t - b p, with per-sample scalars: for L = -cos(p, t),
        # a = cos / |p|^2, b = 1 / (|p| |t|), c = cos / |t|^2; for L = 1/2 ||p - t||^2,
        # a = b = c = 1. The clamp only guards a ReLU output that is zero.
        if cosine is False:
            d_z = p - t
        else:
            inv_p, inv_t = (zt * zt).sum(1, keepdim=True).clamp_(min=1e-24).rsqrt_() \
                .split_with_sizes(views, 2)
            b = inv_p * inv_t
            cos = (p * t).sum(1, keepdim=True).mul_(b)
            a = cos * inv_p * inv_p
            if cosine is not True:  # per-run losses
                a, b = torch.addcmul(euc_w, cos_w, a), torch.addcmul(euc_w, cos_w, b)
            d_z = (a * p).addcmul_(b, t, value=-1)
        if online_views == 1:  # both members of each pair share z: add their gradients
            d_z = d_z.sum(2, keepdim=True)
        if WP is not None:  # chain rule through p = W_P z, except where IsoLoss drops W_P^T
            Q = torch.addcmul(iso * torch.eye(M, dtype=dtype), 1 - iso, WP)
            d_z = (Q @ d_z.view(S, M, -1)).view(z.shape)
        if floor is not None:
            d_z = d_z.mul_(mask)
        # G = d_z x1 as (x1^T d_z^T)^T: MKL's faster way round at a few thousand samples
        G = torch.mm(x[:online_views * n].T, d_z.view(S * M, -1).T).T.view(S, M, N)
        if nsg is not None:  # without stop-gradient the target branch contributes too
            t, p = t[nsg], p[nsg]
            if cosine is False:
                d_t = t - p
            else:
                c = cos[nsg] * inv_t[nsg] * inv_t[nsg]
                if cosine is not True:
                    c = torch.addcmul(euc_w[nsg], cos_w[nsg], c)
                d_t = (c * t).addcmul_(b[nsg], p, value=-1)
            if floor is not None:
                d_t = d_t.mul_(torch.sub(t, floor if floor.shape[0] == 1 else floor[nsg]).sign_())
            x2 = x[online_views * n:]
            G[nsg] += torch.mm(x2.T, d_t.reshape(-1, x2.shape[0]).T).T.view(-1, M, N)
        return G

    return grad


def draws(samples, N, sigma, both, steps):
    """The inputs of one step after another, stacked as grad_fn's x: the online view(s), then
    the target views x + noise and x - noise, n = samples // 2 rows each (antithetic pairs: the
    part of the gradient linear in the noise, zero on average and all that is left when the
    online and target outputs agree, cancels exactly within each pair). One online view, the
    clean x, or with noise on both views two, x + noise' and x - noise'. float32: five times
    faster to draw than float64, and the sampling error dwarfs rounding.
    Drawn for a few steps at once, about 256 KB, which stays in the cache (a larger chunk costs
    more than the calls it saves), in the order x, noise, noise' of one step, then the next
    step's: the same numbers as separate calls, step by step.
    """
    n = samples // 2
    views = 4 if both else 3
    chunk = max(1, min(steps, 2**16 // (views * n * N)))
    sign = sigma * torch.tensor([1.0, -1.0, 1.0, -1.0] if both else [0.0, 1.0, -1.0])
    while True:
        r = torch.randn(chunk, 2 + both, n, N)  # x, noise, noise'
        noise = r[:, [2, 2, 1, 1]] if both else r[:, 1:]
        yield from torch.addcmul(r[:, :1], sign.view(1, -1, 1, 1), noise).view(chunk, -1, N)


@torch.inference_mode()
def simulate(W0, names, lrs, steps, relu, args, samples, record_every=1, keep_W=False, label=""):
    """Gradient descent of all runs of one block at once. W0: (M, N), or (S, M, N) per run;
    relu: one bool for all runs, or one per run (linear and ReLU runs then share the samples).
    The Monte Carlo runs, whatever their loss and activation, take one gradient call per step.

    Returns the recorded steps (T,), the eigenvalues of W W^T (T, S, M), ascending, and with
    keep_W the weights (T, S, M, N).
    """
    S = len(names)
    relu = list(relu) if isinstance(relu, (list, tuple)) else [relu] * S
    cos_of = [parse(n)[0] for n in names]
    # order the runs [exact | Monte Carlo | Monte Carlo without stop-gradient]: slices
    mc = [not (args.exact and not relu[s] and not cos_of[s]) for s in range(S)]
    order = sorted(range(S), key=lambda s: (mc[s], "no-stopgrad" in names[s]))
    names, relu, cos_of = ([v[s] for s in order] for v in (names, relu, cos_of))
    W = W0.to(torch.float64).expand(S, *W0.shape[-2:])[order].clone()
    lrs = torch.tensor([lrs[s] for s in order], dtype=torch.float64).view(-1, 1, 1)
    f = flags(names)
    uses_pred, any_pred = f[1], bool(f[1].any())
    n_exact = S - sum(mc)
    exact, sampled = slice(0, n_exact), slice(n_exact, S)
    f_exact = [v[exact] for v in f]
    both = float(args.noise_both_views)
    # float32 for the Monte Carlo runs: their sampling error dwarfs rounding
    W_ex, W_mc = W[exact], W[sampled].float()
    lr_mc = (lrs[sampled] / (samples // 2 * 2)).float()  # grad returns the sum over the samples
    if n_exact < S:
        def per_run(values):  # one bool if all Monte Carlo runs agree, else one flag per run
            values = values[sampled]
            return values[0] if len(set(values)) == 1 else torch.tensor(values).view(-1, 1)

        no_sg = 1 - f[3][sampled].view(-1, 1)
        grad = grad_fn(per_run(cos_of), f[2][sampled], no_sg if no_sg.any() else None,
                       per_run(relu), torch.float32, 1 + args.noise_both_views, 2)
        mc_pred = bool(uses_pred[sampled].any())
        inputs = draws(samples, W.shape[2], args.sigma, args.noise_both_views, steps)
    rec_steps, rec_lam, rec_W, K = [], [], [], None
    for step in range(steps + 1):
        record = step % record_every == 0 or step == steps
        if any_pred or record:
            W = torch.cat([W_ex, W_mc.double()])
            if not torch.isfinite(W).all():
                bad = [n for n, ok in zip(names, torch.isfinite(W).flatten(1).all(1)) if not ok]
                raise SystemExit(f"{label}: {bad} diverged (non-finite W) before step {step}; "
                                 f"try a smaller learning rate")
            if any_pred or K is None:
                WP, lam = predictor(W, uses_pred, args.alpha)
                # the exact runs' E[dL/dW] = K W; K changes only with W_P (not at all without)
                K = expected_grad_matrix(WP[exact], f_exact, args.sigma, both)
            else:  # no predictor: only the eigenvalues, of the recorded steps
                lam = torch.linalg.eigvalsh(W @ W.mT).clamp(min=0)
            if record:
                rec_steps.append(step)
                rec_lam.append(lam)
                if keep_W:
                    rec_W.append(W)
        if step == steps:
            break
        if n_exact and any_pred:
            W_ex = W_ex - lrs[exact] * (K @ W_ex)
        elif n_exact and record:  # constant K: jump to the next record, W <- (I - lr K)^k W
            k = min(step + record_every, steps) - step
            eye = torch.eye(K.shape[-1], dtype=K.dtype)
            W_ex = torch.linalg.matrix_power(eye - lrs[exact] * K, k) @ W_ex
        if n_exact < S:
            G = grad(W_mc, WP[sampled].float() if mc_pred else None, next(inputs))
            W_mc.addcmul_(lr_mc, G, value=-1)
    back = np.argsort(order)  # undo the grouping
    out = dict(steps=np.array(rec_steps), lam=torch.stack(rec_lam).numpy()[:, back])
    if keep_W:
        out["W"] = torch.stack(rec_W).numpy()[:, back]
    return out


# ---------------------------------------------------------------- the theory (METHOD.md section 4)

def mode_rates(lam, name, sigma, both, alpha):
    """g_m: eigenvalue of the expected gradient in mode m (d lambda_m/dt = -2 eta g_m lambda_m);
    lam (M,) of the setting `name`, or (S, M) of a list of S settings."""
    return rates_of(name, sigma, both, alpha)(lam)


def rates_of(name, sigma, both, alpha):
    """mode_rates as a function of lam alone: the flags are parsed once, not at every step."""
    if isinstance(name, str):
        cosine, has_pred, iso, stopgrad = np.array(parse(name))
    else:  # one flag per run, (S, 1)
        cosine, has_pred, iso, stopgrad = np.array([parse(n) for n in name]).T[..., None]
    a, b = 1 + both * sigma**2, 1 + sigma**2
    losses = set(np.ravel(cosine).tolist())

    def rates(lam):
        p = np.where(has_pred, lam**alpha, 1.0)
        q = np.where(iso | ~has_pred, 1.0, p)
        if False in losses:  # Euclidean: exact
            g = q * (a * p - 1) + np.where(stopgrad, 0.0, b - p)
        if True in losses:
            # cosine, mean field: |p|, |t|, p.t replaced by sqrt(E|p|^2), sqrt(E|t|^2), E[p.t];
            # the factor a of E|p|^2 cancels in the online term, b in the target term
            tr = lam.sum(-1, keepdims=True)
            pl, p2l = (p * lam).sum(-1, keepdims=True), (p * p * lam).sum(-1, keepdims=True)
            norm = np.sqrt(a * p2l * b * tr)
            g_cos = -q / norm * (1 - p * pl / p2l) - np.where(stopgrad, 0.0, (p - pl / tr) / norm)
            g = np.where(cosine, g_cos, g) if False in losses else g_cos
        return g

    return rates


def theory(lam0, name, lr, steps, record_steps, sigma, both, alpha):
    """Eigenvalue trajectories of the eigenmode equations, one gradient step at a time: lam0 (M,)
    of the setting `name` at learning rate lr, or (S, M) of a list of settings and of rates."""
    lam, rates = np.array(lam0, dtype=np.float64), rates_of(name, sigma, both, alpha)
    lr = lr if isinstance(name, str) else np.asarray(lr, dtype=np.float64)[:, None]
    if not any(parse(n)[1] for n in ([name] if isinstance(name, str) else name)):
        # no predictor: the rates do not depend on lambda (cosine: they are zero), so each
        # mode is a geometric sequence; no need to step through 100,000 steps
        factor = (1 - lr * rates(lam)) ** 2
        return lam * factor ** np.reshape(record_steps, (-1,) + (1,) * lam.ndim).astype(float)
    out, wanted = [], set(record_steps.tolist())
    # a mixed block also computes cosine rates for its Euclidean runs (then discarded), which
    # divide by zero once such a run has collapsed completely
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(steps + 1):
            if step in wanted:
                out.append(lam.copy())
            if step < steps:
                lam = (1 - lr * rates(lam)) ** 2 * lam
    return np.array(out)


# ---------------------------------------------------------------- one figure block

def init_weights(seed, M, N):
    """The notebook's convention: W0 = randn(M, N) / 4 right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.randn(M, N) / 4


def deviation(lam, th):
    """Largest |simulation - theory| / theory over steps and modes; modes the theory puts below
    1e-3 of the largest have collapsed, and there only the absolute difference counts."""
    floor = 1e-3 * th.max(axis=-1, keepdims=True)
    return float(np.max(np.abs(lam - th) / np.maximum(th, floor)))


def summarise(labels, sim, th):
    """Per-run numbers for summary.json and the table."""
    rows = {}
    for s, label in enumerate(labels):
        lam = sim["lam"][:, s]
        start, end = lam[0], lam[-1]
        smallest = lam[:, 0]
        reached = np.nonzero(smallest >= 0.5 * smallest[-1])[0]
        rows[label] = dict(
            final_eigenvalues=[float(v) for v in end],
            trace_start=float(start.sum()), trace_end=float(end.sum()),
            complete_collapse=bool((end < 1e-3 * start).all()),
            dimensional_collapse=bool(end[0] < 1e-3 * end[-1]),
            steps_to_half_final_smallest=int(sim["steps"][reached[0]]),
            max_rel_deviation_from_theory=None if th is None else deviation(lam, th[:, s]),
        )
    return rows


def analyse(names, lrs, relu, sim, args, labels=None):
    """Attach the theory (linear runs only) to a simulation; the per-run numbers for the table."""
    th = None
    if not relu:  # all runs of the block at once
        th = sim["theory"] = theory(sim["lam"][0], names, lrs, sim["steps"][-1], sim["steps"],
                                    args.sigma, float(args.noise_both_views), args.alpha)
    return summarise(labels or names, sim, th)


def timed_simulate(label, W0, names, lrs, steps, relu, args, samples, record_every=1,
                   keep_W=False):
    """simulate, with a progress line."""
    t0 = time.time()
    sim = simulate(W0, names, lrs, steps, relu, args, samples, record_every, keep_W, label)
    print(f"  {label:<36} {len(names):>2} runs x {steps:>6} steps  {time.time() - t0:5.1f} s",
          flush=True)
    return sim


# ---------------------------------------------------------------- plotting

def grid_axes(title):
    # fixed margins: constrained_layout measures every tick label, half the time of a figure
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5))
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.08, top=0.9, wspace=0.3, hspace=0.35)
    fig.suptitle(title)
    for i, loss in enumerate(("euclidean", "cosine")):
        for j, variant in enumerate(VARIANTS):
            # y given: matplotlib then skips measuring the axis below it at every draw
            axes[i, j].set_title(f"{loss}-{variant}", fontsize=10, y=1)
    return fig, axes


def panel(axes, name):
    loss, variant = name.split("-", 1)
    return axes[("euclidean", "cosine").index(loss), VARIANTS.index(variant)]


def plot_trajectories(path, title, names, sim, probes, relu):
    """The 2-d outputs z = W x of the probe inputs over training (circle: start, dot: end)."""
    fig, axes = grid_axes(title)
    for ax in axes.flat:
        ax.set_axis_off()
    W = torch.from_numpy(sim["W"])  # (T, S, 2, N)
    z = probes.double() @ W.mT  # (T, S, P, 2)
    z = z.relu() if relu else z
    # three artists per panel (lines, start and end points), not three per probe
    colors = [f"C{k % 10}" for k in range(z.shape[2])]
    for s, name in enumerate(names):
        ax = panel(axes, name)
        ax.set_axis_on()
        ax.plot(z[:, s, :, 0], z[:, s, :, 1], lw=1)
        ax.scatter(z[0, s, :, 0], z[0, s, :, 1], s=16, facecolors="none", edgecolors=colors)
        ax.scatter(z[-1, s, :, 0], z[-1, s, :, 1], s=9, c=colors)
        ax.set_aspect("equal", "datalim")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_eigen(ax, sim, s, color=None, label=None):
    steps, lam = sim["steps"], sim["lam"][:, s]
    if color is None:  # one colour per mode
        ax.set_prop_cycle(color=plt.cm.viridis(np.linspace(0, 1, lam.shape[1])))
    lines = ax.plot(steps, lam, color=color, lw=1.5)
    if label:
        lines[0].set_label(label)
    if "theory" in sim:
        ax.plot(steps, sim["theory"][:, s], "--", color="k", lw=0.8, alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-12))  # below that, collapsed modes are rounding
    ax.set_xlabel("step")
    ax.set_ylabel("eigenvalue of W W$^T$")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))


def plot_eigen_grid(path, title, names, sims):
    fig, axes = grid_axes(title)
    for ax in axes.flat:
        ax.set_axis_off()
    for name in names:
        sim, s = sims[name]
        ax = panel(axes, name)
        ax.set_axis_on()
        plot_eigen(ax, sim, s)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the figures

def lr_of(name, args):
    """Learning rate of a run in the eigenvalue panels."""
    fast = name.startswith("cosine") or name == "euclidean-no-predictor"
    return args.lr_fast if fast else args.lr


def simulate_figures(args, relu_of_fig, names):
    """All runs of the figures (relu_of_fig: {fig: relu}), one simulation per kind of panel: the
    trajectory panels of Figs. 2 and 6 together with Fig. 5 (N = 6, M = 2), the eigenvalue panels
    of Figs. 2 and 6 (N = 15, M = 10), and their no-predictor runs over no_predictor_steps. The
    runs of a simulation share the samples of each step (separate simulations of Figs. 2 and 6
    would draw the same ones: each starts from the same seed), and a step costs one pass of
    Python for all of them. Returns the probe inputs of the trajectory panels and
    {fig: {kind: sim}}."""
    grids = {fig: relu for fig, relu in relu_of_fig.items() if fig != "fig5"}
    W0 = init_weights(args.seed, 2, 6)
    fig5_inits = (W0, 2 * W0, torch.randn(2, 6) / 2)  # W0, 2 W0, randn/2 (the next draw)
    W0 = init_weights(args.seed, 2, 6)  # reseed: the probes follow W0, as without Fig. 5
    draws = torch.randn(5000, 6)
    probes = draws[draws.norm(dim=1).argsort(descending=True)[:20]]  # the 20 largest-norm
    sims = {fig: {} for fig in relu_of_fig}
    for kind, steps, samples, every in (
            ("trajectories", args.steps, args.samples, 1),
            ("eigenvalues-short", args.steps, args.samples, 1),
            ("eigenvalues-long", args.no_predictor_steps, args.samples_long,
             max(1, args.no_predictor_steps // 1000))):
        # runs: (figure, setting, W0, learning rate, relu), each figure's a contiguous block
        if kind == "trajectories":
            runs = [(fig, n, W0, args.lr, relu) for fig, relu in grids.items() for n in names]
            if "fig5" in relu_of_fig:
                runs += [("fig5", f"{loss}-standard", W, args.lr, relu_of_fig["fig5"])
                         for loss in ("euclidean", "cosine") for W in fig5_inits]
        else:
            W0 = init_weights(args.seed, 10, 15)
            runs = [(fig, n, W0, lr_of(n, args), relu) for fig, relu in grids.items()
                    for n in names if ("no-predictor" in n) == kind.endswith("long")]
        if not runs:
            continue
        fig_of, settings, W0s, lrs, relu = zip(*runs)
        sim = timed_simulate(kind, torch.stack(W0s), list(settings), list(lrs), steps, list(relu),
                             args, samples, every, keep_W=kind == "trajectories")
        for fig in dict.fromkeys(fig_of):
            own = [s for s, f in enumerate(fig_of) if f == fig]
            own = slice(own[0], own[-1] + 1)
            sims[fig][kind] = {k: v if k == "steps" else v[:, own] for k, v in sim.items()}
    return probes, sims


def fig2_or_6(fig, args, relu, names, probes, sims):
    """Trajectory grid (N = 6, M = 2) and eigenvalue grid (N = 15, M = 10) for one activation,
    from this figure's runs of simulate_figures."""
    t0, act = time.time(), "ReLU" if relu else "linear"
    block, sim = f"{fig}-trajectories", sims["trajectories"]
    summary = {block: analyse(names, [args.lr] * len(names), relu, sim, args)}
    np.savez(os.path.join(args.out_dir, f"{block}.npz"), names=names, probes=probes.numpy(), **sim)
    if args.plots:
        plot_trajectories(os.path.join(args.out_dir, f"{fig}_trajectories.png"),
                          f"{fig}: outputs of 20 probe inputs ({act}, N=6, M=2)", names, sim,
                          probes, relu)
    # eigenvalues: the short runs and the long no-predictor runs, two simulations
    block = f"{fig}-eigenvalues"
    summary[block], panels = {}, {}
    for tag in ("short", "long"):
        group = [n for n in names if ("no-predictor" in n) == (tag == "long")]
        if not group:
            continue
        sim = sims[f"eigenvalues-{tag}"]
        summary[block].update(analyse(group, [lr_of(n, args) for n in group], relu, sim, args))
        panels.update({n: (sim, s) for s, n in enumerate(group)})
        np.savez(os.path.join(args.out_dir, f"{block}-{tag}.npz"), names=group, **sim)
    if args.plots:
        plot_eigen_grid(os.path.join(args.out_dir, f"{fig}_eigenvalues.png"),
                        f"{fig}: eigenvalues of W W$^T$ ({act}, N=15, M=10; dashed: "
                        f"{'theory' if not relu else 'no theory for ReLU'})", names, panels)
    print(f"  {'theory, .npz files, figures':<52} {time.time() - t0:5.1f} s", flush=True)
    return summary


def fig5(args, relu, sim):
    """Euclidean vs cosine (standard) from three initialisations, N = 6, M = 2, from the runs of
    simulate_figures."""
    labels = [f"{loss}-standard, init {init}" for loss in ("euclidean", "cosine")
              for init in ("W0", "2 W0", "randn/2")]
    names, lrs = [label.split(",")[0] for label in labels], [args.lr] * len(labels)
    sim = {k: v for k, v in sim.items() if k != "W"}
    t0 = time.time()
    summary = {"fig5": analyse(names, lrs, relu, sim, args, labels)}
    np.savez(os.path.join(args.out_dir, "fig5.npz"), names=labels, **sim)
    if args.plots:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.85, wspace=0.25)
        fig.suptitle(f"fig5: three initialisations ({'ReLU' if relu else 'linear'}, N=6, M=2; "
                     "dashed: theory)")
        for s, label in enumerate(labels):
            ax = axes[0 if label.startswith("euclidean") else 1]
            plot_eigen(ax, sim, s, color=f"C{s % 3}", label=label.split(", ")[1])
        for ax, title in zip(axes, ("euclidean-standard", "cosine-standard")):
            ax.set_title(title, y=1)
            ax.legend()
        fig.savefig(os.path.join(args.out_dir, "fig5.png"), dpi=100)
        plt.close(fig)
    print(f"  {'theory, .npz file, figure':<52} {time.time() - t0:5.1f} s", flush=True)
    return summary


def print_table(summary):
    print(f"\n{'block':<22}{'setting':<36}{'final eigenvalues (ascending)':<64}"
          f"{'trace start->end':>18}{'collapse':>10}{'half@':>8}{'vs theory':>10}")
    for block, rows in summary.items():
        for name, r in rows.items():
            eig = " ".join(f"{v:.3g}" for v in r["final_eigenvalues"])
            col = "complete" if r["complete_collapse"] else (
                "dimension" if r["dimensional_collapse"] else "-")
            dev = r["max_rel_deviation_from_theory"]
            print(f"{block:<22}{name:<36}{eig:<64}"
                  f"{r['trace_start']:>8.3f}->{r['trace_end']:<8.3f}{col:>10}"
                  f"{r['steps_to_half_final_smallest']:>8}"
                  f"{'-' if dev is None else f'{dev:.1%}':>10}")


def main(args):
    # the tensors are small: a second thread only adds synchronisation
    torch.set_num_threads(1)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    if min(args.samples, args.samples_long) < 2:
        raise SystemExit("--samples and --samples-long must be at least 2 (antithetic pairs)")
    relu_of = {"default": None, "linear": False, "relu": True}[args.activation]
    names = [n for n in SETTINGS if n in args.settings]
    summary = {}
    relu_of_fig = {fig: (fig == "fig6") if relu_of is None else relu_of for fig in args.figures}
    print("simulations, each of all figures' runs of one kind", flush=True)
    probes, sims = simulate_figures(args, relu_of_fig, names)
    for fig, relu in relu_of_fig.items():
        print(f"{fig} ({'ReLU' if relu else 'linear'})", flush=True)
        summary.update(fig5(args, relu, sims[fig]["trajectories"]) if fig == "fig5"
                       else fig2_or_6(fig, args, relu, names, probes, sims[fig]))
    with open(os.path.join(args.out_dir, "summary.json"), "w") as fh:
        json.dump(dict(args=vars(args), results=summary), fh, indent=1)
    print_table(summary)
    print(f"\nwrote {args.out_dir}/ in {time.time() - t0:.1f} s")
    return summary


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
