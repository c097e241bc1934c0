"""train_byol.py and train_simsiam.py (issues 4 and 10): end to end on tiny data in the real formats,
every preset of the grid, the default method without a preset, the schedules, the EMA target, the
symmetric loss, DDP with two processes, the collapse of the ablations, and the two deliberate copies
staying the same outside their METHOD blocks."""

import dataclasses
import difflib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import rundir as R
import train_byol as B
import train_simsiam as S
from tiny_data import write_cifar10, write_fashionmnist, write_imagefolder

REPO = Path(__file__).resolve().parent.parent
# Small enough for CPU tests, large enough for BatchNorm and a spectrum.
TINY = dict(width=0.0625, proj_hidden=32, proj_dim=16, pred_hidden=32, batch_size=8, num_workers=0, log_every=1,
            warmup_epochs=0, epochs=1, steps_per_epoch=1)
METRIC_KEYS = {"epoch", "step", "loss", "cosine_loss", "readout_loss", "online_readout_top1", "online_readout_top5",
               "eigenvalues", "participation_ratio", "std_normalized_z", "lr", "tau", "images_per_s", "wall_time_s",
               "collapse_warning", "knn_top1", "erank_z", "erank_f", "cov_z_eigenvalues", "cov_f_eigenvalues",
               "mean_share_z", "train_s", "epoch_s"}


pytestmark = pytest.mark.usefixtures("no_onednn")  # see conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return dict(cifar=write_cifar10(root / "cifar", n_train_per_class=4, n_test_per_class=2),
                fmnist=write_fashionmnist(root / "fmnist", n_train_per_class=2, n_test_per_class=1),
                folder=write_imagefolder(root / "folder", n_classes=4, n_train_per_class=16, n_val_per_class=2,
                                         size=32))


def tiny(preset, data, dataset: str, out: Path, **kw):
    where = {"cifar10": dict(dataset="cifar10", data_dir=str(data["cifar"])), "digits": dict(dataset="digits"),
             "fashionmnist": dict(dataset="fashionmnist", data_dir=str(data["fmnist"])),
             "imagefolder": dict(dataset="imagefolder", data_dir=str(data["folder"]), crop=16)}[dataset]
    return dataclasses.replace(preset, out_dir=str(out), **{**TINY, **where, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_script(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


# --- end to end, as a user runs it --------------------------------------------------------------


@pytest.mark.parametrize("script,preset,dataset", [("train_byol.py", "byol", "imagefolder"),
                                                   ("train_simsiam.py", "isoloss", "cifar10")])
def test_end_to_end_writes_everything_and_a_torchvision_backbone(tmp_path, data, script, preset, dataset):
    out = tmp_path / "run"
    where = (["--dataset", "imagefolder", "--data-dir", str(data["folder"]), "--crop", "16"] if dataset == "imagefolder"
             else ["--dataset", "cifar10", "--data-dir", str(data["cifar"])])
    r = run_script(script, preset, *where, "--out-dir", str(out), "--epochs", "2", "--steps-per-epoch", "1",
                   "--batch-size", "4", "--width", "0.0625", "--proj-hidden", "32", "--proj-dim", "16",
                   "--pred-hidden", "32", "--num-workers", "0", "--warmup-epochs", "0", "--log-every", "1")
    assert r.returncode == 0, r.stderr
    assert "img/s" in r.stdout and "ETA" in r.stdout  # the progress line
    for name in ("metrics.jsonl", "eigenvalues.png", "online_readout.png", "last.pt", "backbone.pt", "backbone.json",
                 "config.json"):
        assert (out / name).is_file(), name
    lines = metrics(out)
    assert [r["epoch"] for r in lines] == [1, 2] and [r["step"] for r in lines] == [1, 2]
    for rec in lines:
        assert METRIC_KEYS <= rec.keys()
        assert len(rec["eigenvalues"]) == 16 and rec["eigenvalues"] == sorted(rec["eigenvalues"])
        assert 0 <= rec["online_readout_top1"] <= rec["online_readout_top5"] <= 100
    assert (lines[-1]["tau"] is None) == (script == "train_simsiam.py")
    # What produced the run: the commit of this checkout, the versions, the machine (also in backbone.json).
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for where in ("config.json", "backbone.json"):
        made_by = json.loads((out / where).read_text())["provenance"]
        assert made_by["git_commit"] == head and isinstance(made_by["git_dirty"], bool), where
        assert ((made_by["torch"], made_by["torchvision"]) == (torch.__version__, torchvision.__version__)
                and made_by["cpu"])

    # A tiny width has torchvision's parameter names with smaller tensors; width 1 is tested below.
    state = torch.load(out / "backbone.pt", weights_only=True)
    meta = json.loads((out / "backbone.json").read_text())
    assert (meta["width"], meta["small_stem"], meta["out_dim"]) == (0.0625, True, 32)
    assert state.keys() == torchvision.models.resnet18().state_dict().keys() - {"fc.weight", "fc.bias"}
    common.resnet18(meta["width"], meta["small_stem"]).load_state_dict(state, strict=True)
    # ... and it is the trained backbone of the checkpoint, not a fresh one.
    ckpt = common.load_checkpoint(out / "last.pt")
    for k, v in state.items():
        assert torch.equal(v, ckpt["model"][f"backbone.{k}"]), k


@pytest.mark.parametrize("crop", [32, 64, 96])
def test_the_readmes_loading_lines_load_the_backbone_into_torchvision(tmp_path, crop):
    """The README's own code block, executed: the release's small stem (padding 2, no max-pool) for 32-pixel
    crops, torchvision's own stem for TinyImageNet's 64 and STL-10's 96; the features are the same."""
    readme = (REPO / "README.md").read_text()
    block = (readme.split("The backbone loads into a plain torchvision ResNet-18:", 1)[1]
             .split("```python\n", 1)[1].split("```", 1)[0])
    assert block.count('run = "') == 1
    small_stem = common.uses_small_stem(crop)
    learner = B.Learner(dataclasses.replace(B.Args(), proj_hidden=32, proj_dim=16), 10, small_stem)
    R.export_backbone(learner.backbone, tmp_path, width=1.0, small_stem=small_stem, crop=crop)
    scope = {}
    exec(re.sub(r'run = ".*"', f"run = {str(tmp_path)!r}", block), scope)
    x = torch.randn(2, 3, crop, crop)
    torch.testing.assert_close(scope["model"].eval()(x), learner.backbone.eval()(x))


# --- every preset of the grid -------------------------------------------------------------------

# One step of each preset whose step no other test takes: the paper's presets are `byol` / `simsiam` with the
# method's flags, which the grid test (tests/test_grid.py) runs row by row; test_presets_hold_the_papers_settings
# builds every preset. Left: the learnable linear predictor and the laptop presets on their own data.
OWN_STEP = [(script, name) for script in ("byol", "simsiam") for name in ("linear", "cpu-demo", "laptop")]


@pytest.mark.parametrize("script,name", OWN_STEP)
def test_presets_the_grid_does_not_run_take_a_step(tmp_path, data, script, name):
    module = B if script == "byol" else S
    preset = module.PRESETS[name][1]
    # The laptop presets on their own data, the others: BYOL on the CIFAR reader, SimSiam on ImageFolder.
    dataset = {"cpu-demo": "digits", "laptop": "fashionmnist"}.get(
        name, "cifar10" if script == "byol" else "imagefolder")
    args = tiny(preset, data, dataset, tmp_path / "run")
    learner = module.train(args)
    (rec,) = metrics(tmp_path / "run")
    assert rec["step"] == 1 and all(torch.isfinite(torch.tensor([rec["loss"], rec["cosine_loss"]])))
    assert (getattr(learner, "target", None) is not None) == (script == "byol")
    assert ("eigenvector_alignment" in rec) == (preset.predictor == "linear")
    assert torch.linalg.eigvalsh(learner.correlation()).max() > 0  # C is tracked for every predictor
    if preset.isoloss:
        assert rec["loss"] != rec["cosine_loss"]  # IsoLoss's value is not the cosine loss; both are logged


def test_presets_hold_the_papers_settings():
    closed = {"directpred", "directcopy", "isoloss", "isoloss-directcopy"}
    for module, ema in ((B, True), (S, False)):
        for name, (_, a) in module.PRESETS.items():
            # The method is the script's: the EMA target and LARS in train_byol.py, neither in train_simsiam.py.
            learner = module.Learner(dataclasses.replace(a, **TINY), 2, True)
            assert hasattr(learner, "target") is ema, name
            optimizer = module.make_optimizer(a, learner)
            assert isinstance(optimizer, common.LARS if ema else torch.optim.SGD), name
            if name in ("cpu-demo", "laptop"):  # laptop scale; the long laptop runs keep the paper's optimiser
                if name == "laptop":
                    assert (a.lr, a.weight_decay, a.tau_c, a.momentum) == ((1.0, 1e-5, 0.998, 0.9) if ema
                                                                            else (0.1, 1e-5, 0.5, 0.9))
                continue
            assert a.weight_decay == 1e-5, name  # every method, the release's configs (METHOD.md 6)
            assert (a.lr, a.tau_c) == ((1.0, 0.998) if ema else (0.1, 0.5)), name
            assert a.momentum == 0.9 and a.batch_size == 256 and a.epochs == 1000 and a.warmup_epochs == 10
            assert a.isoloss == name.startswith("isoloss")
            if name in closed:
                assert a.predictor == ("directcopy" if name.endswith("directcopy") else "directpred")
        assert B.Args().tau_base == 0.99 and B.Args().tau_final == 1.0 and B.Args().lars_eta == 0.02


def test_command_line_preset_then_overrides():
    a = B.parse(["isoloss", "--dataset", "cifar100", "--weight-decay", "3e-4"])
    assert (a.predictor, a.isoloss, a.dataset, a.weight_decay, a.name) == ("directpred", True, "cifar100", 3e-4,
                                                                           "byol-isoloss")
    a = S.parse(["no-stop-grad", "--epochs", "5"])
    assert (a.stop_grad, a.epochs, a.name) == (False, 5, "simsiam-no-stop-grad")


@pytest.mark.parametrize("module,method", [(B, "byol"), (S, "simsiam")])
def test_without_a_preset_each_script_runs_its_own_method(tmp_path, data, module, method):
    assert module.parse(["--dataset", "cifar10"]) == dataclasses.replace(module.Args(), dataset="cifar10")
    assert module.Args().name == method and module.Args().predictor == "mlp"
    out = tmp_path / "run"
    learner = module.main(["--dataset", "imagefolder", "--data-dir", str(data["folder"]), "--crop", "16", "--out-dir",
                           str(out), *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items())])
    assert json.loads((out / "config.json").read_text())["name"] == method
    assert (getattr(learner, "target", None) is not None) == (module is B)


@pytest.mark.parametrize("module", [B, S])
def test_help_lists_the_presets(module, capsys):
    with pytest.raises(SystemExit):
        module.parse(["--help"])
    shown = capsys.readouterr().out
    assert all(name in shown for name in module.PRESETS)


def test_the_two_scripts_are_the_same_outside_their_method_blocks():
    """The deliberate copy (CleanRL style): a fix that lands in one script and not the other fails here."""
    def outside(path):
        kept, labels, inside = [], [], False
        for n, line in enumerate((REPO / path).read_text().splitlines(), 1):
            if line.strip().startswith("# --- METHOD ("):
                assert not inside, f"{path}:{n}: a METHOD block inside another"
                inside = True
                labels.append(line.split("): ", 1)[1])
                kept.append(f"<method block: {labels[-1]}>")
            elif line.strip() == "# --- END METHOD ---":
                assert inside, f"{path}:{n}: END METHOD without METHOD"
                inside = False
            elif not inside:
                kept.append(line)
        assert not inside and labels, path
        return kept
    byol, simsiam = outside("train_byol.py"), outside("train_simsiam.py")
    assert byol == simsiam, "\n".join(difflib.unified_diff(byol, simsiam, "train_byol.py", "train_simsiam.py",
                                                           lineterm=""))
    for path in ("train_byol.py", "train_simsiam.py"):  # neither imports the other
        assert not re.search(r"^\s*(import|from) train_", (REPO / path).read_text(), re.M), path


# --- schedules, EMA target, symmetric loss ------------------------------------------------------


def test_tau_follows_the_cosine_from_base_to_final():
    total = 1000
    assert B.tau_at(0, total, 0.99, 1.0) == pytest.approx(0.99)
    assert B.tau_at(250, total, 0.99, 1.0) == pytest.approx(1 - 0.01 * (1 + 2 ** -0.5) / 2)
    assert B.tau_at(500, total, 0.99, 1.0) == pytest.approx(0.995)
    assert B.tau_at(750, total, 0.99, 1.0) == pytest.approx(1 - 0.01 * (1 - 2 ** -0.5) / 2)
    assert B.tau_at(total, total, 0.99, 1.0) == pytest.approx(1.0)
    taus = [B.tau_at(s, total, 0.99, 1.0) for s in range(total + 1)]
    assert taus == sorted(taus)


def test_learning_rate_is_the_releases_warmup_then_cosine():
    """Linear from 3e-5 at step 0 to the peak at step W - 1, the peak at W, then a cosine to zero at the end."""
    peak, total, warm = 2.0, 1100, 100
    assert B.lr_at(0, total, warm, peak) == 3e-5
    assert B.lr_at(1, total, warm, peak) == pytest.approx(3e-5 + (peak - 3e-5) / 99)
    assert B.lr_at(50, total, warm, peak) == pytest.approx(3e-5 + 50 * (peak - 3e-5) / 99)
    assert B.lr_at(99, total, warm, peak) == pytest.approx(peak)
    assert B.lr_at(100, total, warm, peak) == pytest.approx(peak)
    assert B.lr_at(101, total, warm, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 1000)))
    assert B.lr_at(600, total, warm, peak) == pytest.approx(peak / 2)
    assert B.lr_at(1100, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert B.lr_at(0, total, 0, peak) == pytest.approx(peak)  # no warm-up: the peak from the start
    assert S.lr_at is not B.lr_at and all(S.lr_at(k, total, warm, peak) == B.lr_at(k, total, warm, peak)
                                          for k in (0, 1, 100))


@pytest.mark.parametrize("module", [B, S])
def test_the_training_loop_sets_each_groups_learning_rate(tmp_path, data, module):
    """What the loop wrote into the optimiser at steps 0, 1 and W: the network at lr x batch/256, the readout at
    readout_lr x batch/256, both on the release's schedule."""
    seen = []
    real = module.train_step

    def spy(model, learner, optimizer, *rest):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        return real(model, learner, optimizer, *rest)
    args = tiny(module.PRESETS["isoloss"][1], data, "cifar10", tmp_path / "run", steps_per_epoch=2, epochs=3,
                warmup_epochs=1.0, lr=0.8, readout_lr=0.4, knn_k=0, eval_every=3)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(module, "train_step", spy)
        module.train(args)
    peak, readout = 0.8 * 8 / 256, 0.4 * 8 / 256
    for k, want in ((0, (3e-5, 3e-5)), (1, (peak, readout)), (2, (peak, readout))):  # W = 2 warm-up steps
        assert seen[k] == pytest.approx(dict(ssl=want[0], readout=want[1])), k
    assert seen[3]["ssl"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)))


def test_weight_decay_and_lars_groups_are_the_releases():
    """LARS (with EMA): decay and trust ratio on the network's weights, neither on its biases and norm layers;
    the readout never decays (its weight adapted, its bias not). SGD (without EMA): decay on every parameter of
    the network, biases and norm layers included; none on the readout."""
    for module in (B, S):
        args = dataclasses.replace(module.PRESETS["isoloss"][1], **TINY)
        learner = module.Learner(args, 3, True)
        groups = module.make_optimizer(args, learner).param_groups
        net = {id(p) for p in (*learner.online_parameters(), *learner.predictor.parameters())}
        readout = {id(p) for p in learner.readout.parameters()}
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(net | readout)  # each parameter once
        for g in groups:
            names = {"ssl" if id(p) in net else "readout" for p in g["params"]}
            assert names == {g["name"]}
            decays = g["name"] == "ssl" and (module is S or all(p.ndim > 1 for p in g["params"]))
            assert g["weight_decay"] == (1e-5 if decays else 0.0), (module.__name__, g["name"])
            if module is B:
                assert g["lars"] == all(p.ndim > 1 for p in g["params"])
        bn = learner.backbone.bn1.weight
        assert any(g["weight_decay"] == 1e-5 and any(p is bn for p in g["params"]) for g in groups) == (module is S)


def test_lars_matches_the_releases_update():
    """eta |w| / (|g| + wd |w| + 1e-8), clipped at 1 after dividing by the lr; a zero |w| or |g| leaves the plain
    gradient, without decay; groups with lars=False get plain momentum SGD."""
    torch.manual_seed(0)
    w, still, fresh, b = (nn.Parameter(t)
                          for t in (torch.randn(4, 3), torch.randn(5, 2), torch.zeros(2, 2), torch.randn(3)))
    g = {w: torch.randn(4, 3), still: torch.zeros(5, 2), fresh: torch.randn(2, 2), b: torch.randn(3)}
    opt = common.LARS([dict(params=[w, still, fresh]), dict(params=[b], weight_decay=0.0, lars=False)], lr=0.5,
                      momentum=0.9, weight_decay=1e-2, eta=0.02)
    before = {p: p.detach().clone() for p in g}
    for p, grad in g.items():
        p.grad = grad.clone()
    opt.step()
    trust = 0.02 * before[w].norm() / (g[w].norm() + 1e-2 * before[w].norm() + 1e-8)
    assert 0.01 < trust / 0.5 < 1  # the trust ratio acts here, unclipped
    torch.testing.assert_close(w.detach(), before[w] - 0.5 * (g[w] + 1e-2 * before[w]) * (trust / 0.5))
    torch.testing.assert_close(still.detach(), before[still])  # |g| = 0: no step, and no decay either
    torch.testing.assert_close(fresh.detach(), -0.5 * g[fresh])  # |w| = 0: the plain gradient
    torch.testing.assert_close(b.detach(), before[b] - 0.5 * g[b])


def small_learner(ema=True, **kw):
    """train_byol.py's Learner (EMA target) or train_simsiam.py's (none)."""
    torch.manual_seed(0)
    module = B if ema else S
    return module.Learner(dataclasses.replace(module.Args(), **{**TINY, **kw}), n_classes=3, small_stem=True)


def test_target_equals_online_when_tau_is_zero():
    learner = small_learner()
    with torch.no_grad():
        for p in learner.online_parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in learner.target.parameters()]
    B.ema_update(learner.target, learner.online_parameters(), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(learner.target.parameters(), before))
    B.ema_update(learner.target, learner.online_parameters(), 0.5)
    assert all(torch.allclose(t, (b + o) / 2) for t, b, o in zip(learner.target.parameters(), before,
                                                                  learner.online_parameters()))
    B.ema_update(learner.target, learner.online_parameters(), 0.0)
    assert all(torch.equal(t, o) for t, o in zip(learner.target.parameters(), learner.online_parameters()))


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_training_loop_moves_the_target_with_tau(tmp_path, data, tau):
    args = tiny(B.PRESETS["byol"][1], data, "cifar10", tmp_path / "run", steps_per_epoch=2, tau_base=tau, tau_final=tau)
    torch.manual_seed(args.seed)
    initial = [p.clone() for p in B.Learner(args, 10, True).target.parameters()]
    learner = B.train(args)
    online = [p.cpu() for p in (*learner.backbone.parameters(), *learner.projector.parameters())]
    assert not all(torch.equal(o, i) for o, i in zip(online, initial))  # the online network did learn
    ref = online if tau == 0.0 else initial
    assert all(torch.equal(t.cpu(), r) for t, r in zip(learner.target.parameters(), ref))


@pytest.mark.parametrize("ema,stop_grad", [(True, True), (False, True), (False, False)])
def test_loss_is_the_sum_of_both_view_orders_with_the_stop_gradient_where_it_belongs(ema, stop_grad):
    learner = small_learner(ema, predictor="linear", **({} if ema else dict(stop_grad=stop_grad)))
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, -1])  # -1: an unlabeled image (STL-10), ignored by the readout
    params = [*learner.online_parameters(), learner.predictor.weight]
    loss, ssl, cosine, ce, std = learner(x1, x2, y)
    got = torch.autograd.grad(loss, params)

    # By hand. In training mode BatchNorm uses batch statistics, so a second pass gives the same outputs.
    z1, z2 = (learner.projector(learner.backbone(x)) for x in (x1, x2))
    if ema:
        with torch.no_grad():
            t1, t2 = learner.target(x1), learner.target(x2)
    else:
        t1, t2 = (z1.detach(), z2.detach()) if stop_grad else (z1, z2)
    p1, p2 = learner.predictor(z1), learner.predictor(z2)
    expect = common.cosine_loss(p1, t2, stop_grad=False) + common.cosine_loss(p2, t1, stop_grad=False)
    torch.testing.assert_close(ssl, expect.detach())
    assert ssl > 2.0  # the sum of two losses in [0, 4] for unrelated outputs, not their mean
    # The same gradient: the readout (on detached features) adds nothing to the network's gradient,
    # and the targets pass a gradient exactly when the no-stop-gradient ablation asks for it.
    want = torch.autograd.grad(expect, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if ema:
        assert not any(p.requires_grad for p in learner.target.parameters())
    # The readout: the mean over both views of the cross-entropy of the labelled images (the release's).
    f1, f2 = learner.backbone(x1), learner.backbone(x2)
    want_ce = (F.cross_entropy(learner.readout(f1), y, ignore_index=-1)
               + F.cross_entropy(learner.readout(f2), y, ignore_index=-1)) / 2
    torch.testing.assert_close(ce, want_ce.detach())


@pytest.mark.parametrize("ema", [True, False])
def test_C_takes_each_view_in_turn_and_each_view_is_predicted_with_its_own_W_P(ema):
    """The release's order: C <- tau_c C + (1 - tau_c) S1, view 1 predicted from it; then C <- tau_c C + (1 - tau_c) S2,
    view 2 predicted from that; so C ends at tau_c^2 C0 + tau_c (1 - tau_c) S1 + (1 - tau_c) S2."""
    tau_c = 0.5
    learner = small_learner(ema, predictor="directpred", tau_c=tau_c)
    g = torch.Generator().manual_seed(2)
    A = torch.randn(16, 16, generator=g, dtype=torch.float64)
    C0 = A @ A.T / 16
    learner.predictor.C.copy_(C0)
    seen = []
    real = learner.predictor.forward
    learner.predictor.forward = lambda z: (seen.append((z.detach().clone(), learner.predictor.W.clone())), real(z))[1]
    x1, x2 = torch.randn(6, 3, 16, 16, generator=g), torch.randn(6, 3, 16, 16, generator=g)
    _, ssl, _, _, _ = learner(x1, x2, torch.zeros(6, dtype=torch.long))

    z1, z2 = (learner.projector(learner.backbone(x)).detach() for x in (x1, x2))
    with torch.no_grad():
        t1, t2 = (learner.target(x1), learner.target(x2)) if ema else (z1, z2)
    S1, S2 = (z.double().T @ z.double() / len(z) for z in (z1, z2))
    after1 = tau_c * C0 + (1 - tau_c) * S1
    after2 = tau_c * after1 + (1 - tau_c) * S2

    def W_of(Cm):  # DirectPred: W_P = U diag((s / max s)^0.5) U^T
        s, U = torch.linalg.eigh(Cm)
        return (U * (s.clamp_min(0) / s.max()).sqrt()) @ U.T
    torch.testing.assert_close(learner.predictor.C, after2)
    torch.testing.assert_close(after2, tau_c**2 * C0 + tau_c * (1 - tau_c) * S1 + (1 - tau_c) * S2)
    assert len(seen) == 2
    for (z, W), want_z, C_then in zip(seen, (z1, z2), (after1, after2)):
        torch.testing.assert_close(z, want_z)
        torch.testing.assert_close(W, W_of(C_then))
    assert not torch.allclose(seen[0][1], seen[1][1], atol=1e-3)  # two different W_P in one step
    p1, p2 = (z @ W.float() for z, W in ((z1, seen[0][1]), (z2, seen[1][1])))
    torch.testing.assert_close(ssl, common.cosine_loss(p1, t2) + common.cosine_loss(p2, t1))


# --- several processes --------------------------------------------------------------------------


def test_two_processes_with_torchrun_hold_the_same_C_and_weights(tmp_path, data):
    wrapper = tmp_path / "rank_dump.py"
    wrapper.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import train_byol\n"
        "learner = train_byol.main(argv=sys.argv[1:])\n"
        f"torch.save(learner.state_dict(), os.path.join({str(tmp_path)!r}, f\"rank{{os.environ['RANK']}}.pt\"))\n")
    out = tmp_path / "run"
    r = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
                   "isoloss", "--device", "cpu", "--dataset", "cifar10", "--data-dir", str(data["cifar"]),
                   "--out-dir", str(out), "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "8",
                   "--width", "0.0625", "--proj-hidden", "32", "--proj-dim", "16", "--num-workers", "0",
                   "--warmup-epochs", "0", "--log-every", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    assert s0["predictor.C"].abs().sum() > 0
    # Only rank 0 wrote the run directory, and it counted both ranks' samples.
    assert [m["step"] for m in metrics(out)] == [3]
    assert r.stdout.count("epoch 1/1") == 1


# --- collapse of the ablations (METHOD.md section 1) -------------------------------------------------


def test_on_real_digits_the_health_metrics_tell_the_collapsed_ablations_from_simsiam(tmp_path):
    """The collapse ablations against SimSiam, in seconds on real images (the README's laptop runs show the
    same at length): the ablations collapse onto one direction of z, which std(z/|z|) of the training
    batches shows (and the collapse warning reports), with a larger share of the mean in z than SimSiam's;
    SimSiam's MLP predictor keeps z spread out."""
    d, final = 16, {}
    for name in ("simsiam", "no-predictor", "no-stop-grad"):
        args = dataclasses.replace(S.PRESETS[name][1], dataset="digits", crop=16, out_dir=str(tmp_path / name),
                                   **{**TINY, "proj_dim": d, "proj_hidden": 64, "pred_hidden": 64, "batch_size": 32,
                                      "steps_per_epoch": 10, "epochs": 3, "lr": 0.8, "log_every": 100, "eval_every": 3,
                                      "collapse_epochs": 2})
        S.train(args)
        final[name] = metrics(tmp_path / name)[-1]
        assert 0 <= final[name]["knn_top1"] <= 100 and final[name]["erank_z"] >= 1
    healthy = 1 / d ** 0.5
    assert final["simsiam"]["std_normalized_z"] > 0.5 * healthy and not final["simsiam"]["collapse_warning"]  # 0.21
    for name in ("no-predictor", "no-stop-grad"):
        assert final[name]["std_normalized_z"] < 0.2 * healthy and final[name]["collapse_warning"], name  # 0.013
        assert final[name]["mean_share_z"] > final["simsiam"]["mean_share_z"] + 0.1, name  # 0.86, 0.56 vs 0.32
