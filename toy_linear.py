"""The toy Siamese network of "Implicit variance regularization in non-contrastive SSL"
(Halvagal, Laborieux, Zenke, NeurIPS 2023): Figs. 2, 5 and 6, with the eigenmode theory drawn
over the simulation.

Reproduce the paper's toy figures (Figs. 2, 5, 6, summary.json; about 30 s on a 2-core CPU,
torch 2.14 CPU, one thread):
    python toy_linear.py
Only some figures or settings, noise on both views, the notebook's 50,000 samples per step:
    python toy_linear.py --figures fig2 --settings euclidean-standard euclidean-isoloss
    python toy_linear.py --noise-both-views
    python toy_linear.py --samples 50000 --no-exact      # slow: the notebook's own budget
Output (default runs/toy_linear/): fig2_trajectories.png, fig2_eigenvalues.png, fig5.png,
fig6_trajectories.png, fig6_eigenvalues.png, one .npz of raw trajectories per figure block,
summary.json; a table of the same numbers is printed at the end.

The model (SPEC sections 4 and 5): z = W x (or relu(W x)), x ~ N(0, I_N); the online view is x,
the target view x + sigma * noise; the predictor W_P = U diag(lambda^alpha) U^T is computed in
closed form from W W^T = U diag(lambda) U^T and is a constant for the gradient; the target is
t = W x_2 (same weights, as in SimSiam). W follows plain gradient descent on the expected loss,
Euclidean 1/2 ||p - t||^2 or cosine -cos(p, t), in eight settings:
    {euclidean, cosine} x {standard, no-stopgrad, no-predictor, isoloss}.
IsoLoss removes the factor W_P^T from the gradient with respect to z (see SPEC section 3).

Exact expectation vs Monte Carlo:
  * linear Euclidean settings (all four): the expected gradient is a closed-form matrix
    polynomial in W (Gaussian inputs only enter through their covariances), so these runs use
    it exactly: no sampling noise, and the no-predictor run does not move at all.
  * cosine settings and everything with ReLU: no closed form, so each step draws `--samples`
    fresh inputs (shared by all runs of a block) and averages the exact per-sample gradients.
    Each input is used twice, with +noise and -noise (antithetic pairs): the part of the
    gradient linear in the noise averages to zero and cancels exactly within a pair, which makes
    2,048 samples give the notebook's curves (50,000 samples) within line width, and 256 enough
    for the slow drift of the 100,000-step no-predictor runs (checked against 1,024 and 4,096).
    Samples are float32 (fast to draw); W and all eigendecompositions are float64.

Theory (dashed lines on every linear eigenvalue panel): each mode's eigenvalue evolves on its own,
lambda_m <- (1 - eta g_m)^2 lambda_m per step, where g_m is the gradient's eigenvalue in that
mode (SPEC section 4 writes the same as the flow d lambda_m/dt = -2 eta g_m lambda_m). For the
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
    WP = U @ torch.diag_embed(lam**alpha) @ U.mT
    eye = torch.eye(W.shape[1], dtype=W.dtype)
    return uses_predictor * WP + (1 - uses_predictor) * eye, lam


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

    W (S, M, N); WP (S, M, M), or None when no run has a predictor; x1, x2 (B, N) shared by all
    runs; cosine, relu: one bool for all runs of the call, or (S, 1) bool tensors, one flag per
    run (then both losses, or both activations, are computed and each run takes its own);
    iso: (S, 1) flags, 1 for IsoLoss; no_sg: (S, 1) flags, 1 where the gradient also flows
    through the target, or None.
    The runs are stacked along the output axis, so that both products with x are single matrix
    multiplications: (B, N) @ (N, S*M) and (S*M, B) @ (B, N).
    """
    S, M, N = W.shape
    h1, h2 = (x @ W.reshape(S * M, N).T for x in (x1, x2))
    h1, h2 = h1.view(-1, S, M), h2.view(-1, S, M)
    # ReLU is max(h, 0) and the identity is max(h, -inf): a per-run floor serves both at once.
    # Per-run flags are widened to (S, M): broadcasting an (S, 1) operand over the last axis is
    # four times slower on the CPU than a contiguous (S, M) one.
    floor = None
    if isinstance(relu, torch.Tensor):
        floor = torch.where(relu.expand(S, M), 0.0, -torch.inf).to(h1.dtype)
    elif relu:
        floor = torch.zeros((), dtype=h1.dtype)
    z, t = (h1, h2) if floor is None else (torch.maximum(h1, floor), torch.maximum(h2, floor))
    p = z if WP is None else torch.einsum("bsm,smk->bsk", z, WP)  # W_P is symmetric
    if cosine is not False:  # L = -cos(p, t); the clamp only guards a ReLU output that is zero
        n_p = p.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        n_t = t.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        p_hat, t_hat = p / n_p, t / n_t
        cos = (p_hat * t_hat).sum(-1, keepdim=True)
        d_p = (cos * p_hat - t_hat) / n_p  # dL/dp, orthogonal to p
        if no_sg is not None:
            d_t = (cos * t_hat - p_hat) / n_t  # dL/dt, orthogonal to t
    if isinstance(cosine, torch.Tensor):
        cosine = cosine.expand(S, M).contiguous()
    if cosine is not True:  # L = 1/2 ||p - t||^2
        d_p_euc = p - t
        if cosine is False:
            d_p, d_t = d_p_euc, -d_p_euc  # (d_t is used only without stop-gradient)
        else:  # per-run losses
            d_p = torch.where(cosine, d_p, d_p_euc)
            d_t = torch.where(cosine, d_t, -d_p_euc) if no_sg is not None else None
    d_z = d_p
    if WP is not None:  # chain rule through p = W_P z, except where IsoLoss drops W_P^T
        d_z = iso * d_p + (1 - iso) * torch.einsum("bsm,smk->bsk", d_p, WP)
    if floor is not None:
        d_z = d_z * (h1 > floor)
    G = d_z.reshape(-1, S * M).T @ x1
    if no_sg is not None:  # without stop-gradient the target branch contributes too
        d_t = d_t * no_sg * (h2 > floor) if floor is not None else d_t * no_sg
        G = G + d_t.reshape(-1, S * M).T @ x2
    return G.view(S, M, N) / x1.shape[0]


def simulate(W0, names, lrs, steps, relu, args, samples, record_every=1, keep_W=False, label="",
             one_call=False):
    """Gradient descent of all runs of one block at once. W0: (M, N), or (S, M, N) per run;
    relu: one bool for all runs, or one per run (linear and ReLU runs then share the samples).
    Monte Carlo runs take one sampled_grad call per loss, or with one_call one for both losses
    (each run computes both and keeps its own: fewer calls, twice the arithmetic, which pays
    only with few samples, where the per-operation overhead of torch dominates).

    Returns the recorded steps (T,), the eigenvalues of W W^T (T, S, M), ascending, and with
    keep_W the weights (T, S, M, N).
    """
    S = len(names)
    relu = list(relu) if isinstance(relu, (list, tuple)) else [relu] * S
    cos_of = [parse(n)[0] for n in names]
    # order the runs [exact | Monte Carlo Euclidean | Monte Carlo cosine] so each group is a slice
    mc = [not (args.exact and not relu[s] and not cos_of[s]) for s in range(S)]
    order = sorted(range(S), key=lambda s: (mc[s], cos_of[s]))
    names, mc = [names[s] for s in order], [mc[s] for s in order]
    relu, cos_of = [relu[s] for s in order], [cos_of[s] for s in order]
    W = W0.to(torch.float64).expand(S, *W0.shape[-2:])[order].clone()
    lrs = torch.tensor([lrs[s] for s in order], dtype=torch.float64).view(-1, 1, 1)
    f = flags(names)
    uses_pred = f[1]
    n_exact = mc.index(True) if any(mc) else S
    exact = slice(0, n_exact)
    f_exact = [v[exact] for v in f]

    def per_run(values):  # one bool if all runs of a group agree, else one flag per run
        return values[0] if len(set(values)) == 1 else torch.tensor(values).view(-1, 1)

    groups = []  # Monte Carlo groups: (slice, has predictor, sampled_grad flags)
    for losses in ((False, True),) if one_call else ((False,), (True,)):
        idx = [s for s in range(n_exact, S) if cos_of[s] in losses]
        if idx:
            g = slice(idx[0], idx[-1] + 1)
            no_sg = 1 - f[3][g].view(-1, 1).float()
            groups.append((g, bool(uses_pred[g].any()),
                           dict(cosine=per_run(cos_of[g]), relu=per_run(relu[g]),
                                iso=f[2][g].view(-1, 1).float(),
                                no_sg=no_sg if no_sg.any() else None)))
    any_pred = bool(uses_pred.any())
    both = float(args.noise_both_views)
    rec_steps, rec_lam, rec_W = [], [], []
    for step in range(steps + 1):
        record = step % record_every == 0 or step == steps
        if any_pred or record:
            finite = torch.isfinite(W).flatten(1).all(1)
            if not finite.all():
                bad = [n for n, ok in zip(names, finite) if not ok]
                raise SystemExit(f"{label}: {bad} diverged (non-finite W) before step {step}; "
                                 f"try a smaller learning rate")
            WP, lam = predictor(W, uses_pred, args.alpha)
            # the exact runs' E[dL/dW] = K W; K changes only with W_P (not at all without one)
            K = expected_grad_matrix(WP[exact], f_exact, args.sigma, both) if n_exact else None
        if record:
            rec_steps.append(step)
            rec_lam.append(lam)
            if keep_W:
                rec_W.append(W.clone())
        if step == steps:
            break
        G = torch.empty_like(W)
        if n_exact:
            G[exact] = K @ W[exact]
        if groups:
            # float32 samples: five times faster to draw, and their sampling error dwarfs
            # rounding. Antithetic noise: every x is used with +noise and -noise, so the part of
            # the gradient linear in the noise (zero on average, and all that is left when the
            # online and target outputs agree) cancels exactly within each pair.
            x = torch.randn(samples // 2, W.shape[2])
            noise = args.sigma * torch.randn_like(x)
            x1, x2 = torch.cat([x, x]), torch.cat([x + noise, x - noise])
            if args.noise_both_views:
                noise = args.sigma * torch.randn_like(x)
                x1 = torch.cat([x + noise, x - noise])
            for g, has_pred, group_flags in groups:
                G[g] = sampled_grad(W[g].float(), WP[g].float() if has_pred else None, x1, x2,
                                    **group_flags)
        W -= lrs * G
    back = np.argsort(order)  # undo the grouping
    out = dict(steps=np.array(rec_steps), lam=torch.stack(rec_lam).numpy()[:, back])
    if keep_W:
        out["W"] = torch.stack(rec_W).numpy()[:, back]
    return out


# ---------------------------------------------------------------- the theory (SPEC section 4)

def mode_rates(lam, name, sigma, both, alpha):
    """g_m: eigenvalue of the expected gradient in mode m (d lambda_m/dt = -2 eta g_m lambda_m)."""
    cosine, has_pred, iso, stopgrad = parse(name)
    p = lam**alpha if has_pred else np.ones_like(lam)
    q = np.ones_like(lam) if (iso or not has_pred) else p
    a, b = 1 + both * sigma**2, 1 + sigma**2
    if not cosine:  # exact
        return q * (a * p - 1) + (0 if stopgrad else b - p)
    # mean field: |p|, |t|, p.t replaced by sqrt(E|p|^2), sqrt(E|t|^2), E[p.t]; the factor a
    # of E|p|^2 cancels in the online term, b cancels in the target term
    pl, p2l = (p * lam).sum(), (p * p * lam).sum()
    norm = np.sqrt(a * p2l * b * lam.sum())
    g = -q / norm * (1 - p * pl / p2l)
    if not stopgrad:
        g = g - (p - pl / lam.sum()) / norm
    return g


def theory(lam0, name, lr, steps, record_steps, sigma, both, alpha):
    """Eigenvalue trajectories of the eigenmode equations, one gradient step at a time."""
    lam, out = np.asarray(lam0, dtype=np.float64).copy(), []
    wanted = set(record_steps.tolist())
    for step in range(steps + 1):
        if step in wanted:
            out.append(lam.copy())
        if step < steps:
            lam = (1 - lr * mode_rates(lam, name, sigma, both, alpha)) ** 2 * lam
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


def run_block(block, names, lrs, steps, relu, W0, args, samples, record_every=1, keep_W=False,
              labels=None, sim=None):
    """Simulate one set of runs (unless `sim` holds them already), attach the theory (linear
    only), print a progress line."""
    t0 = time.time()
    if sim is None:
        sim = simulate(W0, names, lrs, steps, relu, args, samples, record_every, keep_W,
                       label=block)
    th = None
    if not relu:
        both = float(args.noise_both_views)
        th = np.stack([theory(sim["lam"][0, s], n, lrs[s], steps, sim["steps"], args.sigma,
                              both, args.alpha) for s, n in enumerate(names)], axis=1)
        sim["theory"] = th
    rows = summarise(labels or names, sim, th)
    dev = max((r["max_rel_deviation_from_theory"] or 0) for r in rows.values())
    print(f"  {block:<32} {len(names)} runs x {steps:>6} steps  {time.time() - t0:5.1f} s"
          + ("" if th is None else f"  max deviation from theory {dev:.1%}"), flush=True)
    return sim, rows


# ---------------------------------------------------------------- plotting

def grid_axes(title):
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5), constrained_layout=True)
    fig.suptitle(title)
    for i, loss in enumerate(("euclidean", "cosine")):
        for j, variant in enumerate(VARIANTS):
            axes[i, j].set_title(f"{loss}-{variant}", fontsize=10)
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
    for s, name in enumerate(names):
        ax = panel(axes, name)
        ax.set_axis_on()
        for k in range(z.shape[2]):
            line = ax.plot(z[:, s, k, 0], z[:, s, k, 1], lw=1)[0]
            ax.plot(*z[0, s, k], "o", mfc="none", color=line.get_color(), ms=4)
            ax.plot(*z[-1, s, k], "o", color=line.get_color(), ms=3)
        ax.set_aspect("equal", "datalim")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_eigen(ax, sim, s, colors=None, label=None):
    steps, lam = sim["steps"], sim["lam"][:, s]
    for m in range(lam.shape[1]):
        c = colors or plt.cm.viridis(m / max(1, lam.shape[1] - 1))
        ax.plot(steps, lam[:, m], color=c, lw=1.5, label=label if m == 0 else None)
        if "theory" in sim:
            ax.plot(steps, sim["theory"][:, s, m], "--", color="k", lw=0.8, alpha=0.7)
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


def long_runs(args, figs, names):
    """The long no-predictor eigenvalue runs of Figs. 2 and 6 (figs: {fig: relu}), simulated
    together in one block: the linear and ReLU runs share the samples of each step, which halves
    the steps executed in Python. Returns {fig: sim of that figure's runs}."""
    long = [n for n in names if "no-predictor" in n]
    if not long or not figs:
        return {}
    t0 = time.time()
    runs = [(fig, n) for fig in figs for n in long]
    sim = simulate(init_weights(args.seed, 10, 15), [n for _, n in runs],
                   [lr_of(n, args) for _, n in runs], args.no_predictor_steps,
                   [figs[fig] for fig, _ in runs], args, args.samples_long,
                   max(1, args.no_predictor_steps // 1000), label="+".join(figs),
                   one_call=True)  # 256 samples: per-operation overhead dominates
    print(f"  {'+'.join(figs) + ' no-predictor runs':<32} {len(runs)} runs x "
          f"{args.no_predictor_steps:>6} steps  {time.time() - t0:5.1f} s  (one shared simulation)",
          flush=True)
    return {fig: dict(steps=sim["steps"], lam=sim["lam"][:, i * len(long):(i + 1) * len(long)])
            for i, fig in enumerate(figs)}


def fig2_or_6(fig, args, relu, names, long_sim=None):
    """Trajectory grid (N = 6, M = 2) and eigenvalue grid (N = 15, M = 10) for one activation.
    long_sim: the no-predictor eigenvalue runs, if already simulated (see long_runs)."""
    act = "ReLU" if relu else "linear"
    out, summary = {}, {}
    # trajectories: every setting at lr, 1500 steps; 20 largest-norm of 5000 Gaussian inputs
    W0 = init_weights(args.seed, 2, 6)
    draws = torch.randn(5000, 6)
    probes = draws[draws.norm(dim=1).argsort(descending=True)[:20]]
    block = f"{fig}-trajectories"
    sim, summary[block] = run_block(block, names, [args.lr] * len(names), args.steps, relu, W0,
                                    args, args.samples, keep_W=True)
    np.savez(os.path.join(args.out_dir, f"{block}.npz"), names=names, probes=probes.numpy(), **sim)
    if args.plots:
        plot_trajectories(os.path.join(args.out_dir, f"{fig}_trajectories.png"),
                          f"{fig}: outputs of 20 probe inputs ({act}, N=6, M=2)", names, sim,
                          probes, relu)
    # eigenvalues: N = 15, M = 10; the no-predictor runs are long and run as a second batch
    W0 = init_weights(args.seed, 10, 15)
    block = f"{fig}-eigenvalues"
    sims, summary[block] = {}, {}
    short = [n for n in names if "no-predictor" not in n]
    long = [n for n in names if "no-predictor" in n]

    for group, steps, samples, every in ((short, args.steps, args.samples, 1),
                                         (long, args.no_predictor_steps, args.samples_long,
                                          max(1, args.no_predictor_steps // 1000))):
        if not group:
            continue
        sim, rows = run_block(block + (", no-predictor" if group is long else ""), group,
                              [lr_of(n, args) for n in group], steps, relu, W0, args, samples,
                              every, sim=long_sim if group is long else None)
        summary[block].update(rows)
        sims.update({n: (sim, s) for s, n in enumerate(group)})
        tag = "long" if group is long else "short"
        np.savez(os.path.join(args.out_dir, f"{block}-{tag}.npz"), names=group, **sim)
    if args.plots:
        plot_eigen_grid(os.path.join(args.out_dir, f"{fig}_eigenvalues.png"),
                        f"{fig}: eigenvalues of W W$^T$ ({act}, N=15, M=10; dashed: "
                        f"{'theory' if not relu else 'no theory for ReLU'})", names, sims)
    return summary


def fig5(args, relu):
    """Euclidean vs cosine (standard) from three initialisations, N = 6, M = 2."""
    W0 = init_weights(args.seed, 2, 6)
    inits = {"W0": W0, "2 W0": 2 * W0, "randn/2": torch.randn(2, 6) / 2}
    names, W0s, lrs, labels = [], [], [], []
    for loss in ("euclidean", "cosine"):
        for label, W in inits.items():
            names.append(f"{loss}-standard")
            W0s.append(W)
            lrs.append(args.lr)
            labels.append(f"{loss}-standard, init {label}")
    sim, rows = run_block("fig5", names, lrs, args.steps, relu, torch.stack(W0s), args,
                          args.samples, labels=labels)
    summary = {"fig5": rows}
    np.savez(os.path.join(args.out_dir, "fig5.npz"), names=labels, **sim)
    if args.plots:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
        fig.suptitle(f"fig5: three initialisations ({'ReLU' if relu else 'linear'}, N=6, M=2; "
                     "dashed: theory)")
        for s, label in enumerate(labels):
            ax = axes[0 if label.startswith("euclidean") else 1]
            plot_eigen(ax, sim, s, colors=f"C{s % 3}", label=label.split(", ")[1])
        for ax, title in zip(axes, ("euclidean-standard", "cosine-standard")):
            ax.set_title(title)
            ax.legend()
        fig.savefig(os.path.join(args.out_dir, "fig5.png"), dpi=100)
        plt.close(fig)
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
    long_sims = long_runs(args, {f: r for f, r in relu_of_fig.items() if f != "fig5"}, names)
    for fig, relu in relu_of_fig.items():
        print(f"{fig} ({'ReLU' if relu else 'linear'})", flush=True)
        summary.update(fig5(args, relu) if fig == "fig5"
                       else fig2_or_6(fig, args, relu, names, long_sims.get(fig)))
    with open(os.path.join(args.out_dir, "summary.json"), "w") as fh:
        json.dump(dict(args=vars(args), results=summary), fh, indent=1)
    print_table(summary)
    print(f"\nwrote {args.out_dir}/ in {time.time() - t0:.1f} s")
    return summary


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
