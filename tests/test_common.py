"""Tests that pin the math of common.py (METHOD.md sections 2 and 3), and its shared helpers."""

import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common


@pytest.fixture(autouse=True)
def _float64():
    """The identities are checked in float64; other test modules keep torch's default."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def fitted_predictor(d=8, alpha=0.5, eps=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = common.ClosedFormPredictor(d, alpha=alpha, eps=eps, decay=0.0)
    # Anisotropic outputs so that W_P is far from the identity.
    pred.update(torch.randn(64, d, generator=g) * torch.linspace(0.2, 3.0, d))
    return pred


def grad_of(loss_fn, z):
    z = z.clone().requires_grad_(True)
    loss_fn(z).backward()
    return z.grad


# --- gradient identities (METHOD.md 3) ---------------------------------------------------------------


@pytest.mark.parametrize("alpha,eps", [(0.5, 0.0), (1.0, 0.25)])
def test_iso_euclidean_gradient_is_standard_without_WT(alpha, eps):
    pred = fitted_predictor(alpha=alpha, eps=eps)
    W = pred.W
    z, t = torch.randn(16, 8), torch.randn(16, 8)
    g_std = grad_of(lambda z: common.euclidean_loss(pred(z), t), z)
    g_iso = grad_of(lambda z: common.iso_euclidean_loss(z, pred(z), t), z)
    p = z @ W
    torch.testing.assert_close(g_iso, 2 * (p - t) / len(z))
    torch.testing.assert_close(g_std, g_iso @ W)  # per sample: W^T g_iso, W symmetric
    assert not torch.allclose(g_std, g_iso)


@pytest.mark.parametrize("alpha,eps", [(0.5, 0.0), (1.0, 0.25)])
def test_iso_cosine_gradient_is_standard_without_WT(alpha, eps):
    pred = fitted_predictor(alpha=alpha, eps=eps, seed=1)
    W = pred.W
    z, t = torch.randn(16, 8), torch.randn(16, 8)
    g_std = grad_of(lambda z: common.cosine_loss(pred(z), t), z)
    g_iso = grad_of(lambda z: common.iso_cosine_loss(z, pred(z), pred.apply_sqrt(z), t), z)
    p = z @ W
    pn, tn = p.norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
    by_hand = -2 * (t / (pn * tn) - (p * t).sum(1, keepdim=True) * p / (pn**3 * tn)) / len(z)
    torch.testing.assert_close(g_iso, by_hand)
    torch.testing.assert_close(g_std, g_iso @ W)
    assert not torch.allclose(g_std, g_iso)


def test_no_gradient_reaches_target_or_predictor_matrix():
    pred = fitted_predictor()
    z = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    for loss in (common.cosine_loss(pred(z), t), common.euclidean_loss(pred(z), t),
                 common.iso_cosine_loss(z, pred(z), pred.apply_sqrt(z), t), common.iso_euclidean_loss(z, pred(z), t)):
        assert loss.grad_fn is not None
        t.grad = None
        loss.backward()
        assert t.grad is None
    assert not pred.W.requires_grad and not any(p.requires_grad for p in pred.buffers())


def test_stop_grad_false_lets_gradient_reach_target():
    z, t = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    common.cosine_loss(z, t, stop_grad=False).backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


# --- loss values (METHOD.md 3) -----------------------------------------------------------------------


def test_loss_values_by_hand():
    rng = np.random.default_rng(0)
    p, t, z = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    cos = (p * t).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)
    P, T, Z = map(torch.tensor, (p, t, z))
    assert common.cosine_loss(P, T).item() == pytest.approx(np.mean(2 - 2 * cos))
    assert common.euclidean_loss(P, T).item() == pytest.approx(np.mean(((p - t) ** 2).sum(1)))
    # Euclidean IsoLoss has the value of the Euclidean loss.
    assert common.iso_euclidean_loss(Z, P, T).item() == pytest.approx(common.euclidean_loss(P, T).item())
    # Cosine IsoLoss value: -2 [z.t/(|p||t|) - 1/2 (p.t)/(|p|^3|t|) |p_sqrt|^2], with p_sqrt = z here.
    pn, tn = np.linalg.norm(p, axis=1), np.linalg.norm(t, axis=1)
    iso = -2 * ((z * t).sum(1) / (pn * tn) - 0.5 * (p * t).sum(1) / (pn**3 * tn) * (z**2).sum(1))
    assert common.iso_cosine_loss(Z, P, Z, T).item() == pytest.approx(iso.mean())


def test_pair_loss_dispatches_to_each_loss_and_logs_the_cosine_loss():
    pred = fitted_predictor()
    z, t = torch.randn(6, 8), torch.randn(6, 8)
    cosine = common.cosine_loss(pred(z), t)
    for loss, iso, expect in (("cosine", False, cosine), ("euclidean", False, common.euclidean_loss(pred(z), t)),
                              ("cosine", True, common.iso_cosine_loss(z, pred(z), pred.apply_sqrt(z), t)),
                              ("euclidean", True, common.iso_euclidean_loss(z, pred(z), t))):
        value, logged = common.pair_loss(loss, iso, pred, z, t)
        torch.testing.assert_close(value, expect)
        torch.testing.assert_close(logged, cosine)  # the cosine loss is logged beside every loss
    with pytest.raises(ValueError, match="stop-gradients"):
        common.pair_loss("cosine", True, pred, z, t, stop_grad=False)


def test_isoloss_needs_closed_form_predictor():
    z = torch.randn(4, 8)
    for pred in (common.MLPPredictor(8, 16), common.LinearPredictor(8), nn.Identity()):
        for loss in ("cosine", "euclidean"):
            with pytest.raises(ValueError, match="IsoLoss needs a closed-form predictor"):
                common.pair_loss(loss, True, pred, z, z)
    common.check_isoloss(common.build_predictor("directcopy", 8, 16, 0.998))


# --- closed-form predictor (METHOD.md 2) -------------------------------------------------------------


def known_C(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(40, d, generator=g) * torch.linspace(0.5, 2.0, d)
    return Z, Z.T @ Z / len(Z)


def test_closed_form_against_direct_matrix_powers():
    Z, Cm = known_C()
    smax = torch.linalg.eigvalsh(Cm).max()
    for alpha, expect in ((1.0, Cm / smax), (2.0, Cm @ Cm / smax**2)):
        pred = common.ClosedFormPredictor(6, alpha=alpha, eps=0.0, decay=0.0)
        pred.update(Z)
        torch.testing.assert_close(pred.C, Cm)
        torch.testing.assert_close(pred.W, expect)
    pred = common.ClosedFormPredictor(6, alpha=0.5, eps=0.0, decay=0.0)  # DirectPred: W_P^2 = C / max(s)
    pred.update(Z)
    torch.testing.assert_close(pred.W @ pred.W, Cm / smax)
    torch.testing.assert_close(pred.W_sqrt @ pred.W_sqrt, pred.W)
    torch.testing.assert_close(pred.W, pred.W.T)
    assert torch.linalg.eigvalsh(pred.W).min() > -1e-12
    torch.testing.assert_close(pred.eigvals, torch.linalg.eigvalsh(Cm))
    torch.testing.assert_close(pred(Z[:3]), Z[:3] @ pred.W)
    torch.testing.assert_close(pred.apply_sqrt(Z[:3]), Z[:3] @ pred.W_sqrt)
    # Unnormalised (the toy theory's W_P): the spectrum of C itself, so W_P grows with z.
    raw = common.ClosedFormPredictor(6, alpha=0.5, eps=0.0, decay=0.0, normalize=False)
    raw.update(Z)
    torch.testing.assert_close(raw.W @ raw.W, Cm)
    raw.update(3 * Z)
    torch.testing.assert_close(raw.W, 3 * pred.W * smax.sqrt())


def test_directcopy_is_C_over_max_plus_quarter_identity():
    Z, Cm = known_C(seed=3)
    pred = common.build_predictor("directcopy", 6, 16, decay=0.0)
    pred.update(Z)
    torch.testing.assert_close(pred.W, Cm / torch.linalg.eigvalsh(Cm).max() + 0.25 * torch.eye(6))
    assert (pred.alpha, pred.eps) == (1.0, 0.25)
    dp = common.build_predictor("directpred", 6, 16, 0.998)
    assert (dp.alpha, dp.eps, dp.decay) == (0.5, 0.0, 0.998)


def test_running_update_of_C():
    decay = 0.9
    pred = common.ClosedFormPredictor(3, **common.CLOSED_FORM["directpred"], decay=decay)
    B1, B2 = torch.tensor([[1.0, 0, 0], [0, 2, 0]]), torch.tensor([[1.0, 1, 1]])
    pred.update(B1)
    pred.update(B2)
    expect = decay * (1 - decay) * (B1.T @ B1 / 2) + (1 - decay) * (B2.T @ B2 / 1)
    torch.testing.assert_close(pred.C, expect)


def test_degenerate_inputs():
    pred = common.ClosedFormPredictor(4, **common.CLOSED_FORM["directpred"], decay=0.5)
    z = torch.randn(3, 4)
    torch.testing.assert_close(pred(z), z)  # before any data: W_P = I
    pred.update(torch.zeros(5, 4))  # all-zero C: still the identity, no NaN
    torch.testing.assert_close(pred.W, torch.eye(4))
    torch.testing.assert_close(pred.W_sqrt, torch.eye(4))
    pred = common.ClosedFormPredictor(4, alpha=0.5, eps=0.0, decay=0.0)
    u = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    pred.update(u)  # rank one: W_P projects onto u
    assert torch.isfinite(pred.W).all()
    torch.testing.assert_close(pred.W, u.T @ u / (u @ u.T))
    good = pred.C.clone()
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        pred.update(torch.tensor([[float("nan"), 0, 0, 0]]))
    torch.testing.assert_close(pred.C, good)
    with pytest.raises(ValueError):
        common.ClosedFormPredictor(4, alpha=0.0, eps=0.0, decay=0.5)


def _gloo_rank(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    pred = common.ClosedFormPredictor(5, **common.CLOSED_FORM["directpred"], decay=0.5)
    for step in range(3):
        z = torch.randn(7, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(10 * rank + step))
        pred.update(z)
    torch.save({"C": pred.C, "W": pred.W}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_gloo_ranks_hold_the_same_C(tmp_path):
    torch.multiprocessing.spawn(_gloo_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["C"], r1["C"]) and torch.equal(r0["W"], r1["W"])
    # ... and that C is the one of the averaged batch terms.
    expect = torch.zeros(5, 5, dtype=torch.float64)
    for step in range(3):
        zs = [torch.randn(7, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(10 * r + step)).double()
              for r in (0, 1)]
        expect = 0.5 * expect + 0.5 * sum(z.T @ z / 7 for z in zs) / 2
    torch.testing.assert_close(r0["C"], expect)


# --- spectrum helpers ---------------------------------------------------------------------------


def test_spectrum_helpers():
    assert common.participation_ratio(torch.ones(4)) == pytest.approx(4.0)
    assert common.participation_ratio(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1.0)
    assert common.normalized_std(torch.ones(32, 16) * 3).item() == pytest.approx(0.0, abs=1e-12)
    healthy = common.normalized_std(torch.randn(4096, 64)).item()
    assert healthy == pytest.approx(1 / 8, rel=0.05)
    _, Cm = known_C()
    torch.testing.assert_close(common.eigenvector_alignment(Cm @ Cm + torch.eye(6), Cm), torch.ones(6))
    rot = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    assert common.eigenvector_alignment(rot, Cm).min() < 0.9


def test_health_metrics_tell_a_collapsed_representation_from_a_spread_one():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2000, 16, generator=g) + 30  # a large shared mean, variance in every direction
    collapsed = torch.randn(2000, 1, generator=g) * torch.randn(1, 16, generator=g) + 30  # one direction only
    assert (common.effective_rank(common.centred_spectrum(spread)) > 15
            and common.effective_rank(common.centred_spectrum(collapsed)) < 1.5)
    # the uncentred second moment cannot tell them apart: the mean dominates both
    assert common.participation_ratio(torch.linalg.eigvalsh(spread.T @ spread)) < 1.1
    torch.testing.assert_close(common.centred_spectrum(spread),
                               torch.linalg.eigvalsh(torch.cov(spread.T.double())).clamp_min(0))
    assert common.effective_rank(torch.tensor([4.0, 4.0, 0.0])) == pytest.approx(2.0, rel=1e-6)
    y = torch.arange(4).repeat(50)
    bank = F.one_hot(y, 4).double() + 0.01 * torch.randn(200, 4, generator=g)
    assert common.topk_accuracy(common.knn_scores(bank, y, bank, 4, k=20), y, ks=(1,)) == [1.0]


@pytest.mark.parametrize("loss", ["cosine", "euclidean"])
def test_mode_gradients_standard_is_isoloss_times_the_predictor_eigenvalue(loss):
    """The paper's statement in a measurable form: per eigenmode of C, the standard gradient at z is the
    IsoLoss gradient times the eigenvalue s_hat^alpha of W_P; only IsoLoss's cosine step lengthens z."""
    Z, _ = known_C()
    pred = common.ClosedFormPredictor(6, alpha=0.5, eps=0.1, decay=0.0)
    pred.update(Z)
    t = Z + 0.3 * torch.randn(Z.shape, generator=torch.Generator().manual_seed(1))
    out = common.mode_gradients(pred, loss, Z, t)
    torch.testing.assert_close(torch.tensor(out["grad_modes_standard"]),
                               torch.tensor(out["grad_modes_iso"]) * torch.linalg.eigvalsh(pred.W))
    if loss == "cosine":
        assert abs(out["grad_radial_standard"]) < 1e-10 and out["grad_radial_iso"] > 1e-4


# --- backbone, data, plumbing -------------------------------------------------------------------


def test_resnet18_loads_strictly_into_torchvision():
    torch.set_default_dtype(torch.float32)
    try:
        ours = common.resnet18(width=1.0, small_stem=True)
        tv = torchvision.models.resnet18()
        tv.conv1 = nn.Conv2d(3, 64, 3, 1, 2, bias=False)
        tv.maxpool = nn.Identity()
        tv.fc = nn.Identity()
        tv.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 32)
        ours.eval(), tv.eval()
        torch.testing.assert_close(ours(x), tv(x))
        assert ours.out_dim == 512
        small = common.resnet18(width=0.25)
        assert small(x).shape == (2, 128) and small.out_dim == 128
        big = common.resnet18(small_stem=False)
        tv96 = torchvision.models.resnet18()
        tv96.fc = nn.Identity()
        tv96.load_state_dict(big.state_dict(), strict=True)
    finally:
        torch.set_default_dtype(torch.float64)


def test_small_stem_is_the_releases_cifar_stem():
    """3x3, stride 1, padding 2 (34 x 34 maps from 32 x 32 images), PyTorch's default init, no max-pool;
    every other conv keeps torchvision's Kaiming fan-out init, and so does the ImageNet stem."""
    torch.manual_seed(0)
    net = common.resnet18(width=1.0, small_stem=True)
    conv = net.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (2, 2), None)
    assert isinstance(net.maxpool, nn.Identity)
    assert net.relu(net.bn1(conv(torch.randn(1, 3, 32, 32)))).shape[-2:] == (34, 34)
    w = conv.weight.detach()
    bound = 1 / 27 ** 0.5  # kaiming_uniform(a = sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3 * 3 * 3
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # 1,728 draws reach the bound
    assert w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # 0.111; Kaiming fan-out would be 0.059
    fan_out = net.layer1[0].conv1.weight  # 64 * 3 * 3
    assert fan_out.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    big = common.resnet18(small_stem=False).conv1.weight
    assert (big.shape[-1], big.std().item()) == (7, pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.05))


def test_atomic_save_and_clear_checkpoint_errors(tmp_path):
    path = tmp_path / "last.pt"
    common.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    assert common.load_checkpoint(path)["step"] == 1
    with pytest.raises(Exception):
        common.atomic_save({"bad": lambda: 0}, path)  # a failed save keeps the previous file
    assert common.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name in ("trunc.pt", "junk.pt", "absent.pt"):
        with pytest.raises(common.CheckpointError, match=name):
            common.load_checkpoint(tmp_path / name)


def test_the_probe_monitor_reads_features_that_a_large_shared_mean_hides_from_cosine_knn():
    """Two classes a small step apart along one quiet direction, beside a large shared mean and six loud directions
    that carry nothing: cosine k-NN measures angles that the loud ones decide; the probe standardises and
    fits the direction that separates the classes."""
    g = torch.Generator().manual_seed(0)

    def features(n):
        y = torch.arange(n) % 2
        x = torch.randn(n, 8, generator=g)
        x[:, 0] = 100.0  # the shared mean
        x[:, 1] = torch.where(y == 1, 1.0, -1.0) * 0.3 + 0.05 * x[:, 1]
        return x, y
    (xb, yb), (xt, yt) = features(400), features(200)
    probe = common.topk_accuracy(common.probe_scores(xb, yb, xt, 2), yt, ks=(1,))[0]
    knn = common.topk_accuracy(common.knn_scores(xb, yb, xt, 2, k=20), yt, ks=(1,))[0]
    assert probe == 1.0 and knn < 0.9
    # no spread at all: defined
    flat = common.probe_scores(torch.ones(10, 4), torch.arange(10) % 2, torch.ones(3, 4), 2)
    assert torch.isfinite(flat).all()
