"""Reliability of the training scripts (issue 6): exact resume after SIGKILL (data-loader workers 0
and 2), kill during a save, corrupt and incompatible checkpoints, bad input, NaN, collapse warning."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import rundir as R
import train_byol as B
import train_simsiam as S
from tiny_data import write_cifar10, write_imagefolder

REPO = Path(__file__).resolve().parent.parent
# the only fields of metrics.jsonl that may differ between runs
TIMING = {"images_per_s", "wall_time_s", "train_s", "epoch_s"}

# A subprocess that runs train_byol.main with the same kernels as the in-process runs of this module
# (see conftest.no_onednn), optionally hanging in the middle of writing the checkpoint of step SLOW_SAVE_AT.
WRAPPER = """
import io, os, sys, time
import torch
sys.path.insert(0, {repo!r})
torch.backends.mkldnn.enabled = False
slow_at = int(os.environ.get("SLOW_SAVE_AT", "-1"))
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("format") and obj["step"] == slow_at:
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        print("SAVING", flush=True)
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
import train_byol
train_byol.main(argv=sys.argv[1:])
"""


pytestmark = pytest.mark.usefixtures("no_onednn")  # see conftest.py


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train_per_class=8, n_test_per_class=2)


def argv_for(cifar, out, *extra, preset="isoloss"):
    # 3 epochs of 4 steps, a warm-up epoch: closed-form predictor (C), EMA target, LARS. On the CPU even
    # where there is a GPU: bit for bit is promised there only (cuDNN autotuning and TF32 are not exact).
    return [preset, "--device", "cpu", "--dataset", "cifar10", "--data-dir", str(cifar), "--out-dir", str(out),
            "--epochs", "3", "--steps-per-epoch", "4", "--batch-size", "16", "--width", "0.0625", "--proj-hidden", "32",
            "--proj-dim", "16", "--pred-hidden", "32", "--warmup-epochs", "1", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def reference(cifar, tmp_path_factory):
    """The uninterrupted run, with workers 0 and no mid-epoch saves."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    out = tmp_path_factory.mktemp("reference") / "run"
    B.main(argv=argv_for(cifar, out, "--log-every", "100"))
    torch.backends.mkldnn.enabled = before
    return out


def wrapper(tmp_path) -> Path:
    path = tmp_path / "wrapper.py"
    path.write_text(WRAPPER.format(repo=str(REPO)))
    return path


def kill_when(tmp_path, argv, marker: str, env=None):
    """Start the wrapper, SIGKILL it (and its data-loader workers) once `marker` appears in its output."""
    proc = subprocess.Popen([sys.executable, str(wrapper(tmp_path)), *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    return "".join(seen)


def same(a, b, where="") -> None:
    """Bit for bit: tensors with torch.equal, containers recursively, everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_run(run: Path, ref: Path) -> None:
    a, b = common.load_checkpoint(run / "last.pt"), common.load_checkpoint(ref / "last.pt")
    assert R.settings_diff(a["args"], b["args"]) == []
    for key in ("step", "model", "optimizer", "scaler", "rng", "epoch_sums", "low_std_epochs"):
        same(a[key], b[key], key)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(R.read_metrics(run / "metrics.jsonl")) == strip(R.read_metrics(ref / "metrics.jsonl"))
    same(torch.load(run / "backbone.pt", weights_only=True), torch.load(ref / "backbone.pt", weights_only=True))


# --- exact resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_bit_for_bit(tmp_path, cifar, reference, workers, capsys):
    out = tmp_path / "run"
    argv = argv_for(cifar, out, "--num-workers", str(workers), "--save-every", "3", "--log-every", "1")
    log = kill_when(tmp_path, argv, " step 7 ")  # in epoch 2, after the mid-epoch save at step 6
    assert "epoch 1/3" in log
    killed_at = common.load_checkpoint(out / "last.pt")["step"]
    assert killed_at in (6, 8)  # 6 unless the kill came late; 6 means batches of epoch 2 are skipped
    # What a kill between a metrics line and its checkpoint leaves behind: a line past the
    # checkpoint, and a torn one. The resumed run must drop both.
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 8, "loss": 123.0}) + "\n" + '{"epoch": 3, "st')
    B.main(argv=argv)  # the same command again
    assert f"resuming {out / 'last.pt'} at step {killed_at}" in capsys.readouterr().out
    assert_same_run(out, reference)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, cifar, reference):
    out = tmp_path / "run"
    argv = argv_for(cifar, out, "--log-every", "1")
    kill_when(tmp_path, argv, "SAVING", env={"SLOW_SAVE_AT": "8"})  # half of the step-8 checkpoint written
    assert common.load_checkpoint(out / "last.pt")["step"] == 4
    assert list(out.glob(".last.pt.*.tmp")), \
        "the half-written file should still be there for this test to mean anything"
    B.main(argv=argv)
    assert not list(out.glob(".*.tmp"))
    assert_same_run(out, reference)


def test_checkpoint_holds_everything_and_loads_weights_only(reference):
    ckpt = torch.load(reference / "last.pt", weights_only=True)
    assert set(R.CHECKPOINT_KEYS) <= ckpt.keys()
    assert ckpt["step"] == 12 and ckpt["args"]["predictor"] == "directpred"
    assert "predictor.C" in ckpt["model"] and ckpt["model"]["predictor.C"].abs().sum() > 0
    assert any(k.startswith("target.") for k in ckpt["model"]) and any(k.startswith("readout.") for k in ckpt["model"])
    assert ckpt["optimizer"]["state"] and isinstance(ckpt["rng"]["torch"], torch.Tensor)


# --- corrupt and incompatible checkpoints -------------------------------------------------------


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_fails(argv, capsys, *expect, main=B.main) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv=argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for text in expect:
        assert text in err, err
    return err


def _not_weights(path):
    torch.save({"format": R.FORMAT, "payload": io.StringIO("a Python object")}, path)


@pytest.mark.parametrize("damage,expect", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot be read"),
    (lambda p: p.write_bytes(b"\x00garbage" * 100), "cannot be read"),
    (_not_weights, "cannot be read"),  # weights_only=True refuses arbitrary objects
    (lambda p: torch.save({"state_dict": {"w": torch.ones(2)}}, p), "not a checkpoint of this version"),
])
def test_bad_checkpoint_is_one_line_and_overwrites_nothing(tmp_path, cifar, reference, damage, expect, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    damage(out / "last.pt")
    before = snapshot(out)
    run_fails(argv_for(cifar, out), capsys, str(out / "last.pt"), expect, "--overwrite")
    assert snapshot(out) == before


def test_checkpoint_that_does_not_fit_the_model(tmp_path, cifar, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    run_fails(argv_for(cifar, out, "--width", "0.125", "--allow-changes"), capsys, "does not fit this model")
    assert snapshot(out) == before


# --- bad input: one line, non-zero exit, nothing written ----------------------------------------


@pytest.mark.parametrize("extra,expect", [
    (["--predictor", "mlp"], "--isoloss needs a closed-form predictor"),
    (["--batch-size", "1"], "BatchNorm"),
    (["--batch-size", "1000"], "larger than the 80 training images"),
    (["--crop", "64"], "--crop 64 is larger than the 32x32 images of cifar10"),
    (["--overwrite", "--allow-changes"], "contradict"),
    (["--tau-c", "1.0"], "--tau-c"),
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--no-isoloss", "--predictor", "mlp", "--no-normalize-spectrum"], "--no-normalize-spectrum sets the closed-form"),
])
def test_contradictory_options(tmp_path, cifar, extra, expect, capsys):
    out = tmp_path / "run"
    run_fails(argv_for(cifar, out, *extra), capsys, expect)
    assert not out.exists()


def test_isoloss_without_stop_gradient_is_refused(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    run_fails(argv_for(cifar, out, "--no-stop-grad"), capsys, "--isoloss is built from stop-gradients", main=S.main)
    assert not out.exists()


def test_euclidean_without_ema_on_the_normalised_spectrum_is_refused_naming_the_option_that_trains(tmp_path, capsys):
    out = tmp_path / "run"
    for predictor in ("directpred", "directcopy"):
        for iso in ("--isoloss", "--no-isoloss"):
            run_fails(["cpu-demo", "--loss", "euclidean", "--predictor", predictor, iso, "--out-dir", str(out)], capsys,
                      "cannot train", "add --no-normalize-spectrum", main=S.main)
    assert not out.exists()


def test_unknown_option_and_preset(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    # train_byol.py has no stop-gradient switch: its EMA target gets no gradient anyway
    for argv in (argv_for(cifar, out, "--learning-rate", "3"), ["simclr", "--out-dir", str(out)],
                 argv_for(cifar, out, "--no-stop-grad")):
        with pytest.raises(SystemExit) as e:
            B.main(argv=argv)
        assert e.value.code != 0
        assert not out.exists()


def test_missing_or_malformed_data(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["byol", "--out-dir", str(out), "--batch-size", "4"]
    run_fails([*base, "--data-dir", str(tmp_path / "nowhere")], capsys, "cifar-10-batches-py", "--download")
    (tmp_path / "empty" / "cifar-10-batches-py").mkdir(parents=True)
    run_fails([*base, "--data-dir", str(tmp_path / "empty")], capsys, "could not be loaded")
    folder = write_imagefolder(tmp_path / "folder", n_classes=2, n_train_per_class=2, n_val_per_class=1)
    shutil.rmtree(folder / "val")
    run_fails([*base, "--dataset", "imagefolder", "--data-dir", str(folder)], capsys, str(folder / "val"))
    (folder / "val").mkdir()  # a val/ without class folders
    run_fails([*base, "--dataset", "imagefolder", "--data-dir", str(folder)], capsys, "could not be read")
    assert not out.exists()


def test_run_directory_with_other_settings_is_refused_unless_asked(tmp_path, cifar, capsys):
    out = tmp_path / "run"
    short = ["--epochs", "1", "--steps-per-epoch", "1", "--log-every", "100"]
    B.main(argv=argv_for(cifar, out, *short))
    before = snapshot(out)
    run_fails(argv_for(cifar, out, *short, "--lr", "0.5"), capsys, "holds a run with other settings", "lr: 1.0 -> 0.5",
              "--overwrite", "--allow-changes")
    assert snapshot(out) == before
    # Run-time options (workers, logging, saving) are not settings of the run: the same run resumes.
    B.main(argv=argv_for(cifar, out, *short, "--num-workers", "2", "--log-every", "5"))
    assert "already finished" in capsys.readouterr().out
    # --allow-changes resumes with the new settings (here: a longer run) ...
    B.main(argv=argv_for(cifar, out, "--epochs", "2", "--steps-per-epoch", "1", "--allow-changes"))
    assert "with changed settings: epochs: 1 -> 2" in capsys.readouterr().out
    assert [r["step"] for r in R.read_metrics(out / "metrics.jsonl")] == [1, 2]
    # ... and --overwrite starts afresh.
    B.main(argv=argv_for(cifar, out, *short, "--lr", "0.5", "--overwrite"))
    assert [r["step"] for r in R.read_metrics(out / "metrics.jsonl")] == [1]
    assert common.load_checkpoint(out / "last.pt")["args"]["lr"] == 0.5


# --- numerical faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset,nan_from,expect,last_good", [
    ("byol", 3, "NaN or Inf in the weights after step 4, not saved", 2),  # found by the check before a save
    ("isoloss", 4, "step 6: ClosedFormPredictor.update", 4),  # NaN weights give NaN z, refused before C changes
])
def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cifar, monkeypatch, capsys,
                                                                              preset, nan_from, expect, last_good):
    real = B.lr_at
    monkeypatch.setattr(B, "lr_at", lambda step, *a: float("nan") if step >= nan_from else real(step, *a))
    out = tmp_path / "run"
    err = run_fails(argv_for(cifar, out, "--save-every", "2", "--log-every", "100", preset=preset), capsys, expect,
                    f"the last good checkpoint is {out / 'last.pt'} (step {last_good})")
    ckpt = common.load_checkpoint(out / "last.pt")
    assert ckpt["step"] == last_good
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert "--allow-changes" in err


def test_nan_in_the_loss_is_caught_on_a_logging_step(tmp_path, cifar, monkeypatch, capsys):
    real = common.pair_loss

    def poisoned(*args, **kwargs):
        loss, cosine = real(*args, **kwargs)
        poisoned.calls += 1
        return (loss * float("nan") if poisoned.calls == 5 else loss), cosine  # two view orders a step: step 3
    poisoned.calls = 0
    monkeypatch.setattr(common, "pair_loss", poisoned)
    out = tmp_path / "run"
    run_fails(argv_for(cifar, out, "--log-every", "2", preset="byol"), capsys, "NaN or Inf in the loss at step 3",
              "no checkpoint was written yet")
    assert not (out / "last.pt").exists()


def test_collapse_is_reported_in_the_log_and_the_metrics(tmp_path, cifar, monkeypatch, capsys):
    monkeypatch.setattr(common, "normalized_std", lambda z: torch.zeros((), device=z.device))
    out = tmp_path / "run"
    B.main(argv=argv_for(cifar, out, "--steps-per-epoch", "1", "--collapse-epochs", "2", preset="byol"))
    assert [r["collapse_warning"] for r in R.read_metrics(out / "metrics.jsonl")] == [False, True, True]
    err = capsys.readouterr().err
    assert err.count("warning: possible collapse") == 2
