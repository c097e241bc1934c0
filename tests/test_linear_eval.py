"""linear_eval.py on tiny data sets the tests write (classes linearly separable in pixel space).

Backbones are width-0.125 ResNet-18s. The "useful" one is randomly initialised: on these data its
random features already separate the classes (test_useful_backbone_high_constant_backbone_chance
shows it), which is all a test of the evaluation needs. The constant one has every conv weight
zero, so every image maps to the same (zero) feature vector.
"""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import common
import data as D
import linear_eval as L
from tiny_data import write_cifar10

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, N_CLASSES = 20, 10, 10  # per class


def backbone(constant=False, seed=0):
    torch.manual_seed(seed)
    m = common.resnet18(0.125)
    if constant:
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.zeros_(mod.weight)
    return m


def save_backbone(folder, **kw) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(backbone(**kw).state_dict(), folder / "backbone.pt")
    return folder / "backbone.pt"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data"), N_TRAIN, N_TEST)


def fast_args(checkpoint, data, **kw):
    """The defaults, with a smaller sweep and budget (the tiny problems converge well before)."""
    kw = dict(dict(data_dir=str(data), num_workers=0, batch_size=64, wds=(1e-4, 1e-2), lbfgs_iters=50), **kw)
    return L.Args(checkpoint=str(checkpoint), **kw)


@pytest.fixture(scope="module")
def useful_run(data, tmp_path_factory):
    ckpt = save_backbone(tmp_path_factory.mktemp("useful"))
    return ckpt, L.main(fast_args(ckpt, data))


def numbers(result):
    """Everything a run reports that must be identical run to run."""
    lin = result["offline_linear"]
    return (lin["top1"], lin["top5"], lin["chosen"], lin["sweep"], result["knn"]["results"])


# --- the evaluation tells a useful backbone from a constant one ---------------------------------


def test_useful_backbone_high_constant_backbone_chance(useful_run, data, tmp_path, capsys):
    ckpt, good = useful_run
    bad = L.main(fast_args(save_backbone(tmp_path), data))  # a second random init: also useful
    const = L.main(fast_args(save_backbone(tmp_path / "const", constant=True), data))
    for r in (good, bad):
        assert r["offline_linear"]["top1"] >= 0.9
        assert r["knn"]["results"]["k=20"]["top1"] >= 0.9
    chance = 1 / N_CLASSES
    assert const["offline_linear"]["top1"] <= chance + 0.05
    assert const["knn"]["results"]["k=20"]["top1"] <= chance + 0.05
    assert const["knn"]["results"]["k=200"]["top1"] <= chance + 0.05
    # What was written, and labelled how.
    saved = json.loads((ckpt.parent / "linear_eval.json").read_text())
    assert saved["offline_linear"]["top1"] == good["offline_linear"]["top1"]
    assert saved["n_test"] == N_TEST * N_CLASSES and saved["n_train"] == N_TRAIN * N_CLASSES
    assert saved["knn"]["temperature"] == 0.07 and set(saved["knn"]["results"]) == {"k=20", "k=200"}
    assert saved["settings"]["checkpoint"] == str(ckpt)
    out = capsys.readouterr().out
    assert "offline_linear" in out and "knn k=20" in out and "knn k=200" in out


def test_reported_numbers_come_from_the_test_split(data, tmp_path):
    """Scramble the test labels: train-split accuracy stays high, test accuracy must drop to chance."""
    scrambled = tmp_path / "scrambled"
    write_cifar10(scrambled, N_TRAIN, N_TEST)
    path = scrambled / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    batch["labels"] = [(y + 1) % N_CLASSES for y in batch["labels"]]  # every test label now wrong
    path.write_bytes(pickle.dumps(batch))
    r = L.main(fast_args(save_backbone(tmp_path), scrambled))
    assert r["offline_linear"]["train_top1"] >= 0.9
    assert r["offline_linear"]["top1"] <= 0.1
    assert r["knn"]["results"]["k=20"]["top1"] <= 0.1


def test_sweep_sees_only_the_train_split(data, tmp_path, monkeypatch):
    seen = []
    real = L.select_hyperparameters

    def spy(x, y, n_classes, args):
        seen.append(len(y))
        return real(x, y, n_classes, args)

    monkeypatch.setattr(L, "select_hyperparameters", spy)
    r = L.main(fast_args(save_backbone(tmp_path), data))
    assert seen == [N_TRAIN * N_CLASSES]
    assert len(r["offline_linear"]["sweep"]) == 2 and r["offline_linear"]["chosen"] in r["offline_linear"]["sweep"]


# --- the feature cache ---------------------------------------------------------------------------


def test_cache_is_reused_and_gives_identical_numbers(useful_run, data, tmp_path, monkeypatch):
    ckpt, first = useful_run
    caches = sorted(ckpt.parent.glob("features_*.pt"))
    assert len(caches) == 2  # train and test
    mtimes = [p.stat().st_mtime_ns for p in caches]

    def backbone_must_not_run(*a, **k):
        raise AssertionError("the second run ran the backbone instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(L, "extract_features", backbone_must_not_run)
        second = L.main(fast_args(ckpt, data))
    assert numbers(second) == numbers(first)
    assert [p.stat().st_mtime_ns for p in caches] == mtimes
    # Run to run: a fresh output folder recomputes the features and gets the same numbers.
    third = L.main(fast_args(ckpt, data, out_dir=str(tmp_path / "fresh")))
    assert numbers(third) == numbers(first)


def test_other_checkpoint_at_same_path_never_reuses_the_cache(data, tmp_path, monkeypatch):
    ckpt = save_backbone(tmp_path)
    good = L.main(fast_args(ckpt, data))
    torch.save(backbone(constant=True).state_dict(), ckpt)  # overwrite the file in place
    calls = []
    real = L.extract_features
    monkeypatch.setattr(L, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    const = L.main(fast_args(ckpt, data))
    assert len(calls) == 2
    assert len(list(tmp_path.glob("features_*.pt"))) == 4
    assert good["offline_linear"]["top1"] >= 0.9 and const["offline_linear"]["top1"] <= 0.15


# --- what --checkpoint accepts and refuses -----------------------------------------------------


def test_plain_torchvision_state_dicts_load(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(tv.state_dict(), tmp_path / "imagenet_stem.pth")  # with fc.*, 7x7 stem
    small = torchvision.models.resnet18()
    small.conv1, small.maxpool, small.fc = nn.Conv2d(3, 64, 3, 1, 2, bias=False), nn.Identity(), nn.Identity()
    torch.save(small.state_dict(), tmp_path / "small_stem.pth")
    x = torch.randn(2, 3, 32, 32)
    for name, ref, small_stem in (("imagenet_stem.pth", tv, False), ("small_stem.pth", small, True)):
        model, info = L.load_backbone(tmp_path / name)
        assert info["width"] == 1 and info["small_stem"] == small_stem and info["out_dim"] == 512
        ref.fc = nn.Identity()
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), ref.eval()(x))


def test_accepted_containers(tmp_path):
    sd = backbone(seed=1).state_dict()
    other = backbone(seed=2).state_dict()
    cases = {
        "last.pt": {"backbone": sd, "optimizer": {"state": {}}, "step": 3},
        "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "byol.pt": {"model": {**{f"target.backbone.{k}": v for k, v in other.items()},
                              **{f"online.backbone.{k}": v for k, v in sd.items()}}},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        model, _ = L.load_backbone(tmp_path / name)
        for k, v in sd.items():
            assert torch.equal(model.state_dict()[k], v), (name, k)


def test_other_architectures_give_one_clear_line(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    torch.save({"encoder.weight": torch.zeros(3), "head.bias": torch.zeros(2)}, tmp_path / "random.pt")
    sd = backbone().state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(5, 8, 3, 3)  # a shape no ResNet-18 has
    torch.save(sd, tmp_path / "shape.pt")
    for name, words in (("r50.pt", "ResNet-50"), ("r34.pt", "ResNet-34"), ("random.pt", "no ResNet-18"),
                        ("shape.pt", "layer2.0.conv1.weight")):
        with pytest.raises(common.CheckpointError) as e:
            L.load_backbone(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and words in msg and "\n" not in msg


def run_cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "linear_eval.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_bad_checkpoint_and_missing_data_exit_with_one_line(data, tmp_path, capsys):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    (tmp_path / "linear_eval.json").write_text('{"earlier": "result"}\n')
    with pytest.raises(SystemExit) as e:
        L.main(fast_args(tmp_path / "r50.pt", data))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "r50.pt" in err and "ResNet-50" in err
    ckpt = save_backbone(tmp_path)  # and from the command line:
    p = run_cli("--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "nowhere"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cifar10 not found" in p.stderr
    # Nothing written by an earlier run is lost, nothing new is written.
    assert (tmp_path / "linear_eval.json").read_text() == '{"earlier": "result"}\n'
    assert not list(tmp_path.glob("features_*"))


def test_bad_option_combinations_exit_with_one_line(data, tmp_path, capsys):
    ckpt = save_backbone(tmp_path)
    for kw in (dict(augment=True), dict(crop=40)):  # 40: larger than CIFAR's 32 x 32 images
        with pytest.raises(SystemExit) as e:
            L.main(fast_args(ckpt, data, **kw))
        assert e.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


# --- frozen backbone hygiene --------------------------------------------------------------------


def test_backbone_unchanged_check():
    m = L.freeze(backbone())
    ref = L.state_hash(m)
    L.check_unchanged(m, ref)
    m.layer3[0].bn1.running_mean[0] += 1e-3  # a BatchNorm statistic counts as a weight here
    with pytest.raises(RuntimeError, match="changed"):
        L.check_unchanged(m, ref)


def test_backbone_left_in_train_mode_is_caught(data, tmp_path, monkeypatch, capsys):
    """Forget eval mode on purpose: BatchNorm updates its statistics and the run must fail."""
    monkeypatch.setattr(L, "freeze", lambda m: m.requires_grad_(False))
    with pytest.raises(SystemExit) as e:
        L.main(fast_args(save_backbone(tmp_path), data))
    assert e.value.code == 2 and "changed during linear evaluation" in capsys.readouterr().err
    assert not (tmp_path / "linear_eval.json").exists()


def test_features_do_not_depend_on_the_batch(data):
    """Eval mode: an image's features do not depend on the other images of its batch."""
    ds = D.load_dataset("cifar10", data, "test", D.eval_transform("cifar10", 32))
    m = L.freeze(backbone())
    a, ya = L.extract_features(m, ds, torch.device("cpu"), batch_size=7)
    b, yb = L.extract_features(m, ds, torch.device("cpu"), batch_size=64)
    assert torch.equal(ya, yb) and len(a) == N_TEST * N_CLASSES
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_augment_protocol_runs_through_the_frozen_backbone(data, tmp_path, monkeypatch):
    batches = []
    real = L.backbone_batches

    def spy(*a, **k):
        for x, y in real(*a, **k):
            batches.append(len(y))
            yield x, y

    monkeypatch.setattr(L, "backbone_batches", spy)
    r = L.main(fast_args(save_backbone(tmp_path), data, augment=True, classifier="sgd", epochs=2, lrs=(0.3,)))
    assert sum(batches) == 2 * N_TRAIN * N_CLASSES  # every train image, every epoch, through the backbone
    assert r["offline_linear"]["augment"] and r["offline_linear"]["top1"] >= 0.3  # chance is 0.1
    # (the backbone-unchanged check ran inside main: it would have exited otherwise)


def test_lr_schedule():
    assert L.lr_at(0, 100, 0.3) == 0.3
    assert L.lr_at(50, 100, 0.3) == pytest.approx(0.15)
    assert L.lr_at(100, 100, 0.3) == pytest.approx(0.0)


# --- the classifier and k-NN ---------------------------------------------------------------------


def test_standardisation_makes_the_fit_scale_invariant():
    """Per-feature affine changes of the features must not change the classifier's predictions."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(3, 8, generator=g)[y] + 1.5 * torch.randn(300, 8, generator=g)  # overlapping classes
    scale = torch.logspace(-3, 3, 8)
    x2 = x * scale + 100 * torch.randn(8, generator=g)
    args = L.Args(checkpoint="", lbfgs_iters=200)
    with torch.no_grad():
        p1 = L.fit_readout(x, y, 3, "lbfgs", None, 1e-2, args)(x).argmax(1)
        p2 = L.fit_readout(x2, y, 3, "lbfgs", None, 1e-2, args)(x2).argmax(1)
    assert (p1 == p2).double().mean() >= 0.99
    assert 0.5 < (p1 == y).double().mean() < 0.95  # a problem where the fit matters


def test_knn_hand_made():
    # Unit vectors at the given angles (degrees) from the query, which sits at angle 0.
    def at(deg):
        r = torch.deg2rad(torch.tensor(deg, dtype=torch.float64))
        return torch.stack([r.cos(), r.sin()], 1).float()

    train = at([10.0, 60.0, 70.0, 170.0])  # cosines 0.985, 0.5, 0.342, -0.985
    labels = torch.tensor([0, 1, 1, 2])
    query = at([0.0]) * 5  # the norm must not matter: cosine similarity
    s3 = common.knn_scores(train, labels, query, 3, k=3, temperature=0.07)
    cos = torch.tensor([10.0, 60.0, 70.0]).deg2rad().cos()
    w = (cos / 0.07).exp()
    torch.testing.assert_close(s3[0], torch.stack([w[0], w[1] + w[2], torch.tensor(0.0)]))
    assert s3.argmax(1).item() == 0  # two class-1 neighbours, but the class-0 one is far closer
    # At a high temperature the votes are nearly equal and the majority wins.
    assert common.knn_scores(train, labels, query, 3, k=3, temperature=100.0).argmax(1).item() == 1
    # k larger than the train set: everyone votes, including the class-2 point.
    s_all = common.knn_scores(train, labels, query, 3, k=200, temperature=0.07)
    assert s_all[0, 2] > 0 and s_all.argmax(1).item() == 0
    assert common.topk_accuracy(s_all, torch.tensor([2]), ks=(1, 5)) == [0.0, 1.0]


# --- the training scripts' output ----------------------------------------------------------------


def test_vectorised_sgd_sweep_matches_torch_optim_sgd():
    """fit_sgd steps every (lr, wd) setting at once; each must follow torch.optim.SGD exactly."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 4
    x = torch.randn(4, 6, generator=g)[y] + torch.randn(96, 6, generator=g)
    settings, epochs, bs = [(0.3, 1e-2), (0.03, 0.0)], 3, 32
    steps = epochs * 3
    mean, std = x.mean(0), x.std(0)
    got = L.fit_sgd(mean, std, 4, L.feature_batches(x, y, epochs, bs, seed=1), steps, settings, seed=5)
    for k, (lr, wd) in enumerate(settings):
        ref = L.Readout(mean, std, 4)
        with torch.no_grad():  # the same start: fit_sgd draws all K weights from one generator
            ref.linear.weight.copy_((torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(5)) * 0.01)[k])
            ref.linear.bias.zero_()
        opt = torch.optim.SGD(ref.linear.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
        for step, (xb, yb) in enumerate(L.feature_batches(x, y, epochs, bs, seed=1)):
            opt.param_groups[0]["lr"] = L.lr_at(step, steps, lr)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(xb), yb).backward()
            opt.step()
        torch.testing.assert_close(got[k].linear.weight, ref.linear.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[k].linear.bias, ref.linear.bias, rtol=1e-5, atol=1e-6)
