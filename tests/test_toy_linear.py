"""Tests of toy_linear.py: gradients, the eigenmode theory, and the paper's toy outcomes.

The outcomes are those of METHOD.md sections 4 and 5 (linear network, N = 15, M = 10, W0 from
torch.manual_seed(2), 1500 steps, target-view noise sigma = 0.1). Monte Carlo runs use few samples
per step so that the file runs in well under a minute.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import toy_linear as tl  # noqa: E402

EUC = ["euclidean-standard", "euclidean-no-stopgrad", "euclidean-no-predictor", "euclidean-isoloss"]
COS = ["cosine-standard", "cosine-no-stopgrad", "cosine-no-predictor", "cosine-isoloss"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors run fastest on one thread (as in toy_linear.main); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def args(**kw):
    return tl.Args(**kw)


def run(names, lrs, steps=1500, relu=False, samples=1024, W0=None, **kw):
    W0 = tl.init_weights(2, 10, 15) if W0 is None else W0
    torch.manual_seed(0)
    return tl.simulate(W0, names, lrs, steps, relu, args(**kw), samples)


def smallest_reaches(lam, level):
    """First recorded index at which the smallest eigenvalue is at least `level`."""
    hit = np.nonzero(lam[:, 0] >= level)[0]
    return hit[0] if len(hit) else None


# ---------------------------------------------------------------- gradients


def reference_loss(W, WP, x1, x2, name, relu):
    """Each setting's loss written for autograd, IsoLoss in the form of METHOD.md section 3."""
    cosine, has_pred, iso, stopgrad = tl.parse(name)
    act = torch.relu if relu else (lambda h: h)
    z, t = act(x1 @ W.T), act(x2 @ W.T)
    if stopgrad:
        t = t.detach()
    P = WP if has_pred else torch.eye(W.shape[0], dtype=W.dtype)
    p = z @ P
    if not iso:
        loss = -torch.cosine_similarity(p, t, dim=1) if cosine else 0.5 * ((p - t) ** 2).sum(1)
        return loss.mean()
    sg = torch.Tensor.detach
    if not cosine:  # value of 1/2 ||p - t||^2, gradient (p - t) with respect to z
        return (0.5 * ((z - sg(t + z - p)) ** 2).sum(1)).mean()
    lam, U = torch.linalg.eigh(P)
    p_sqrt = z @ (U @ torch.diag(lam.clamp(min=0).sqrt()) @ U.T)  # alpha = 1: W_P^(1/2)
    n_p, n_t = p.norm(dim=1), t.norm(dim=1)
    pt = (p * t).sum(1)
    loss = -((z * t).sum(1) / sg(n_p * n_t) - 0.5 * sg(pt / (n_p**3 * n_t)) * (p_sqrt**2).sum(1))
    return loss.mean()


@pytest.mark.parametrize("relu", [False, True])
def test_sampled_gradient_is_the_exact_gradient_of_each_settings_loss(relu):
    torch.manual_seed(1)
    W = torch.randn(10, 15, dtype=torch.float64) / 4
    WP, _ = tl.predictor(W[None], torch.ones(1, 1, 1, dtype=torch.float64), 1.0)
    x1 = torch.randn(64, 15, dtype=torch.float64)
    x2 = x1 + 0.1 * torch.randn_like(x1)
    for name in EUC + COS:
        cosine, has_pred, iso, stopgrad = tl.parse(name)
        Wr = W.clone().requires_grad_()
        reference_loss(Wr, WP[0], x1, x2, name, relu).backward()
        flag = torch.ones(1, 1, dtype=torch.float64)
        G = tl.sampled_grad(W[None], WP if has_pred else None, x1, x2, cosine, flag * iso,
                            None if stopgrad else flag, relu)[0]
        torch.testing.assert_close(G, Wr.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_one_call_with_per_run_loss_and_activation_flags_equals_separate_calls():
    """simulate runs linear and ReLU, Euclidean and cosine runs in one sampled_grad call."""
    torch.manual_seed(5)
    names = EUC + COS
    W = torch.randn(16, 10, 15, dtype=torch.float64) / 4
    f = tl.flags(names * 2)
    WP, _ = tl.predictor(W, f[1], 1.0)
    x1 = torch.randn(64, 15, dtype=torch.float64)
    x2 = x1 + 0.1 * torch.randn_like(x1)
    relu = [False] * 8 + [True] * 8
    cosine = [tl.parse(n)[0] for n in names * 2]
    G = tl.sampled_grad(W, WP, x1, x2, torch.tensor(cosine).view(-1, 1), f[2].view(-1, 1),
                        1 - f[3].view(-1, 1), torch.tensor(relu).view(-1, 1))
    for s in range(16):
        one = tl.sampled_grad(W[s:s + 1], WP[s:s + 1], x1, x2, cosine[s], f[2][s].view(-1, 1),
                              1 - f[3][s].view(-1, 1), relu[s])
        torch.testing.assert_close(G[s], one[0], rtol=1e-12, atol=1e-14, msg=str(s))


@pytest.mark.parametrize("both", [False, True])
def test_closed_form_expected_gradient_is_the_mean_of_sampled_gradients(both):
    torch.manual_seed(3)
    W = torch.randn(4, 10, 15, dtype=torch.float64) / 4
    f = tl.flags(EUC)
    WP, _ = tl.predictor(W, f[1], 1.0)
    exact = tl.expected_grad(W, WP, f, 0.1, float(both))
    x = torch.randn(200_000, 15, dtype=torch.float64)
    n1, n2 = 0.1 * torch.randn_like(x) * both, 0.1 * torch.randn_like(x)
    x1, x2 = torch.cat([x + n1, x - n1]), torch.cat([x + n2, x - n2])  # antithetic, as simulate
    for s, name in enumerate(EUC):
        _, has_pred, iso, stopgrad = tl.parse(name)
        flag = torch.ones(1, 1, dtype=torch.float64)
        G = tl.sampled_grad(W[s:s + 1], WP[s:s + 1], x1, x2, False, flag * iso,
                            None if stopgrad else flag, False)[0]
        scale = exact[s].norm() + W[s].norm() * 0.1 ** 2  # no-predictor: exact is 0 or O(sigma^2)
        assert (G - exact[s]).norm() < 0.02 * scale, name


def test_cosine_gradient_conserves_the_trace_exactly_except_isoloss():
    """<W, dL/dW> = E[p . dL/dp] + E[t . dL/dt] = 0, sample by sample, for W_P symmetric."""
    torch.manual_seed(4)
    W = torch.randn(4, 10, 15, dtype=torch.float64) / 4
    f = tl.flags(COS)
    WP, _ = tl.predictor(W, f[1], 1.0)
    x1 = torch.randn(256, 15, dtype=torch.float64)
    x2 = x1 + 0.1 * torch.randn_like(x1)
    G = tl.sampled_grad(W, WP, x1, x2, True, f[2].view(-1, 1), 1 - f[3].view(-1, 1), False)
    inner = (W * G).sum((1, 2)) / (W.norm(dim=(1, 2)) * G.norm(dim=(1, 2)))
    assert inner[:3].abs().max() < 1e-12  # standard, no-stopgrad, no-predictor
    assert inner[3] < -1e-3  # IsoLoss: the gradient points inward, so the trace grows


# ---------------------------------------------------------------- theory vs simulation


@pytest.mark.parametrize("both", [False, True])
def test_simulation_follows_the_exact_euclidean_eigenmode_equations(both):
    # the closed-form expectation, all four settings, the paper's 1500 steps
    sim = run(EUC, [0.01] * 4, noise_both_views=both)
    for s, name in enumerate(EUC):
        th = tl.theory(sim["lam"][0, s], name, 0.01, 1500, sim["steps"], 0.1, float(both), 1.0)
        assert tl.deviation(sim["lam"][:, s], th) < 1e-9, name
    # Monte Carlo (antithetic, 8192 samples per step): sampling noise stays within 1%
    names = ["euclidean-standard", "euclidean-isoloss"]
    sim = run(names, [0.01] * 2, steps=600, samples=8192, exact=False, noise_both_views=both)
    for s, name in enumerate(names):
        th = tl.theory(sim["lam"][0, s], name, 0.01, 600, sim["steps"], 0.1, float(both), 1.0)
        assert tl.deviation(sim["lam"][:, s], th) < 0.01, name


def test_theory_fixed_points_with_noise_on_both_views():
    lam0 = np.linspace(0.05, 2, 10)
    for name in ("euclidean-standard", "euclidean-isoloss"):
        lam = tl.theory(lam0, name, 0.01, 20000, np.array([20000]), 0.1, 1.0, 1.0)[-1]
        np.testing.assert_allclose(lam, 1 / 1.01, rtol=1e-6)
    lam = tl.theory(lam0, "euclidean-no-predictor", 0.1, 1000, np.array([1000]), 0.1, 1.0, 1.0)[-1]
    np.testing.assert_allclose(lam, lam0 * (1 - 0.1 * 0.01) ** 2000, rtol=1e-9)  # slow collapse


def test_cosine_mean_field_conserves_the_trace_and_ends_where_the_simulation_does():
    lam = np.linspace(0.02, 2.2, 10)
    for name in ("cosine-standard", "cosine-no-stopgrad", "cosine-no-predictor"):
        g = tl.mode_rates(lam, name, 0.1, 0.0, 1.0)
        assert abs((g * lam).sum()) <= 1e-12 * np.abs(g * lam).sum(), name
    assert (tl.mode_rates(lam, "cosine-isoloss", 0.1, 0.0, 1.0) * lam).sum() < 0  # trace grows
    # end points (not the time course) agree with the simulation, Fig. 5 and Fig. 2 settings
    lam0 = np.linalg.eigvalsh((lambda W: W @ W.T)(tl.init_weights(2, 2, 6).double().numpy()))
    end = tl.theory(lam0, "cosine-standard", 0.01, 1500, np.array([1500]), 0.1, 0.0, 1.0)[-1]
    np.testing.assert_allclose(end, 0.232, rtol=0.005)
    lam0 = np.linalg.eigvalsh((lambda W: W @ W.T)(tl.init_weights(2, 10, 15).double().numpy()))
    end = tl.theory(lam0, "cosine-isoloss", 0.1, 1500, np.array([1500]), 0.1, 0.0, 1.0)[-1]
    np.testing.assert_allclose(end, 1.056, rtol=0.005)


# ---------------------------------------------------------------- the paper's outcomes (METHOD.md 5)


def test_euclidean_outcomes_at_the_papers_settings():
    names = ["euclidean-standard", "euclidean-no-stopgrad", "euclidean-isoloss"]
    sim = run(names, [0.01] * 3)
    std, nsg, iso = (sim["lam"][:, s] for s in range(3))
    # standard: nine modes at the fixed point, the smallest still lagging (METHOD.md section 5: 0.048)
    np.testing.assert_allclose(std[-1, 1:], 1, rtol=0.01)
    assert abs(std[-1, 0] - 0.048) < 0.002
    # IsoLoss: every mode at the fixed point within 1%
    np.testing.assert_allclose(iso[-1], 1, rtol=0.01)
    # no stop-gradient: every mode shrinks at every step (METHOD.md section 5: eight below 0.01, two near 0.3)
    assert (np.diff(nsg, axis=0) < 1e-12).all()  # (up to the rounding of eigh near zero)
    assert (nsg[-1, :8] < 0.01).all() and np.allclose(nsg[-1, 8:], 0.3, atol=0.06)


def test_isoloss_recruits_the_smallest_mode_at_least_3x_sooner():
    sim = run(["euclidean-standard", "euclidean-isoloss"], [0.01] * 2, steps=8000)
    t_std = smallest_reaches(sim["lam"][:, 0], 0.5)  # half the fixed point lambda = 1
    t_iso = smallest_reaches(sim["lam"][:, 1], 0.5)
    assert t_iso is not None and t_std is not None
    assert t_std >= 3 * t_iso, (t_std, t_iso)


def test_euclidean_no_predictor_does_not_move_in_expectation():
    # the closed form is exactly zero; the antithetic Monte Carlo estimate is zero pair by pair
    for exact, rtol in ((True, 1e-12), (False, 1e-5)):  # Monte Carlo: float32 rounding only
        sim = run(["euclidean-no-predictor"], [0.1], steps=2000, samples=64, exact=exact)
        np.testing.assert_allclose(sim["lam"][-1], sim["lam"][0], rtol=rtol)


def test_cosine_outcomes_at_the_papers_settings():
    names = ["cosine-standard", "cosine-isoloss", "cosine-no-stopgrad"]
    sim = run(names, [0.1] * 3)
    std, iso, nsg = (sim["lam"][:, s] for s in range(3))
    trace = sim["lam"].sum(-1)
    # standard: trace conserved (7.88), nine modes isotropic at 0.812, the smallest lagging (0.58)
    np.testing.assert_allclose(trace[-1, 0], 7.882, rtol=0.002)
    np.testing.assert_allclose(std[-1, 1:], 0.812, rtol=0.005)
    assert abs(std[-1, 0] - 0.59) < 0.03
    # IsoLoss: all ten isotropic at 1.06 -- its trace is NOT conserved (7.88 -> 10.57)
    np.testing.assert_allclose(iso[-1], 1.056, rtol=0.005)
    np.testing.assert_allclose(trace[-1, 1], 10.56, rtol=0.005)
    # no stop-gradient (pinned from the simulation; the theory does not say): dimensional
    # collapse onto two modes near 4, trace conserved up to the drift of finite steps
    assert (nsg[-1, :8] < 1e-10).all()
    np.testing.assert_allclose(nsg[-1, 8:], 4.0, rtol=0.05)
    # the flow conserves 7.882; 1,500 finite steps at lr 0.1 add about 1.5% (7.985-7.996 over sample
    # streams), which put the old centre 7.882 at the edge of its own tolerance
    np.testing.assert_allclose(trace[-1, 2], 7.99, rtol=0.015)


def test_cosine_no_predictor_drifts_towards_isotropy():
    """Pinned from the 100,000-step run (mean field: no motion at all; the simulation: a slow
    O(sigma^2) drift that evens out the spectrum, trace conserved). 20,000 steps here."""
    sim = run(["cosine-no-predictor"], [0.1], steps=20000, samples=256)
    lam = sim["lam"][:, 0]
    np.testing.assert_allclose(lam[-1].sum(), lam[0].sum(), rtol=1e-3)
    assert lam[-1, 0] > 4 * lam[0, 0] and lam[-1, -1] < 0.8 * lam[0, -1]


def test_fig5_euclidean_ends_at_one_point_cosine_at_an_init_dependent_isotropic_point():
    W0 = tl.init_weights(2, 2, 6)
    inits = torch.stack([W0, 2 * W0, torch.randn(2, 6) / 2])
    euc = run(["euclidean-standard"] * 3, [0.01] * 3, W0=inits)["lam"][-1]
    cos = run(["cosine-standard"] * 3, [0.01] * 3, W0=inits, samples=512)["lam"]
    np.testing.assert_allclose(euc, 1, rtol=0.01)
    np.testing.assert_allclose(cos[-1, :, 0], cos[-1, :, 1], rtol=0.005)  # isotropic
    np.testing.assert_allclose(cos[-1].sum(-1), cos[0].sum(-1), rtol=0.005)  # at the initial trace
    np.testing.assert_allclose(cos[-1, :, 0], [0.232, 0.926, 1.214], rtol=0.005)


def test_divergence_is_detected_not_silent():
    with pytest.raises(SystemExit, match="diverged"):
        run(["euclidean-no-stopgrad"], [1e3], steps=50)


# ---------------------------------------------------------------- end to end


def test_script_writes_figures_npz_and_summary(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "toy_linear.py"), "--out-dir", str(out),
           "--steps", "30", "--no-predictor-steps", "60", "--samples", "64",
           "--samples-long", "64"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for fig in ("fig2", "fig6"):
        for kind in ("trajectories", "eigenvalues"):
            assert (out / f"{fig}_{kind}.png").stat().st_size > 10_000
    assert (out / "fig5.png").stat().st_size > 10_000
    with np.load(out / "fig2-eigenvalues-short.npz") as z:
        assert z["lam"].shape == (31, 6, 10) and z["theory"].shape == (31, 6, 10)
    with np.load(out / "fig6-trajectories.npz") as z:
        assert z["W"].shape == (31, 8, 2, 6) and "theory" not in z
    summary = json.loads((out / "summary.json").read_text())["results"]
    assert set(summary["fig2-eigenvalues"]) == set(EUC + COS)
    row = summary["fig2-eigenvalues"]["euclidean-isoloss"]
    assert row["final_eigenvalues"] == sorted(row["final_eigenvalues"])
    assert row["max_rel_deviation_from_theory"] < 1e-9
    assert summary["fig6-eigenvalues"]["cosine-standard"]["max_rel_deviation_from_theory"] is None
    assert "fig5" in summary and "vs theory" in res.stdout


# ---------------------------------------------------------------- the fast paths of simulate


@pytest.mark.parametrize("both", [False, True])
def test_antithetic_views_give_the_gradient_of_the_stacked_samples(both):
    """grad_fn on [x; x + n; x - n] (one online view shared by each pair, as simulate passes
    them) equals sampled_grad on x1 = [x; x], x2 = [x + n; x - n], every setting, linear and
    ReLU in one call."""
    torch.manual_seed(6)
    names = EUC + COS
    W = torch.randn(16, 10, 15, dtype=torch.float64) / 4
    f = tl.flags(names * 2)
    WP, _ = tl.predictor(W, f[1], 1.0)
    cosine = torch.tensor([tl.parse(n)[0] for n in names] * 2).view(-1, 1)
    relu = torch.tensor([False] * 8 + [True] * 8).view(-1, 1)
    x, n1, n2 = torch.randn(3, 32, 15, dtype=torch.float64)
    n1, n2 = (0.1 * n1 if both else 0 * n1), 0.1 * n2
    x1, x2 = torch.cat([x + n1, x - n1]), torch.cat([x + n2, x - n2])
    ref = tl.sampled_grad(W, WP, x1, x2, cosine, f[2].view(-1, 1), 1 - f[3].view(-1, 1), relu)
    stacked = torch.cat([x1, x2]) if both else torch.cat([x, x2])
    grad = tl.grad_fn(cosine, f[2].view(-1, 1), 1 - f[3].view(-1, 1), relu, torch.float64,
                      1 + both, 2)
    torch.testing.assert_close(grad(W, WP, stacked) / 64, ref, rtol=1e-10, atol=1e-13)


def test_draws_are_the_numbers_of_one_randn_call_per_step():
    """Drawn a chunk at a time, in the order x, noise of one step after another."""
    torch.manual_seed(7)
    inputs = tl.draws(256, 15, 0.1, False, 100)
    got = [next(inputs) for _ in range(30)]
    torch.manual_seed(7)
    for x1x2 in got:
        x, noise = torch.randn(128, 15), 0.1 * torch.randn(128, 15)
        torch.testing.assert_close(x1x2, torch.cat([x, x + noise, x - noise]), rtol=0, atol=1e-6)


def test_theory_of_a_block_is_the_theory_of_each_run():
    lam0 = np.stack([np.linspace(0.02, 2.2, 10) * (1 + 0.1 * s) for s in range(8)])
    lrs = [0.01, 0.02, 0.1, 0.01, 0.1, 0.1, 0.05, 0.1]
    steps = np.arange(0, 301, 10)
    for both in (0.0, 1.0):
        block = tl.theory(lam0, list(tl.SETTINGS), lrs, 300, steps, 0.1, both, 1.0)
        for s, name in enumerate(tl.SETTINGS):
            one = tl.theory(lam0[s], name, lrs[s], 300, steps, 0.1, both, 1.0)
            np.testing.assert_allclose(block[:, s], one, rtol=1e-12, err_msg=name)


def test_exact_runs_without_predictor_jump_between_records():
    """Without a predictor K is constant and the exact runs jump (I - lr K)^k between records;
    with noise on both views they shrink, and the jump must follow the step-by-step run."""
    names = ["euclidean-no-predictor"]
    every = run(names, [0.1], steps=1000, noise_both_views=True)
    torch.manual_seed(0)
    jumps = tl.simulate(tl.init_weights(2, 10, 15), names, [0.1], 1000, False,
                        args(noise_both_views=True), 1024, record_every=100)
    np.testing.assert_allclose(jumps["lam"], every["lam"][::100], rtol=1e-12)
    assert every["lam"][-1, 0, -1] < every["lam"][0, 0, -1]
