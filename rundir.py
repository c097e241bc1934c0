"""The run directory of train_byol.py and train_simsiam.py: resuming, checkpoints, metrics, figures, faults.

Nothing here is specific to a method; the training scripts call it at the start of a run, at the
end of each epoch and when they save. A run directory (--out-dir) holds:

  config.json       the settings (Args) of the run, and its provenance (git commit, versions, machine)
  metrics.jsonl     one JSON line per epoch (see `epoch_record`)
  eigenvalues.png   the spectra of the running C and of the centred covariances, per epoch
  online_readout.png  accuracy, effective rank and the collapse indicator, per epoch
  last.pt           everything needed to resume exactly, written atomically
  backbone.pt       at the end: a plain torchvision ResNet-18 state_dict, described by backbone.json

Resuming: the same command again continues from last.pt; a directory that holds a run with other
settings is refused (--overwrite starts afresh, --allow-changes resumes with the new settings).
Every refusal and fault is one `error:` line (common.die) that leaves what is on disk as it was.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import common

# Fields that change how a run is executed or reported, never its results: they may differ on resume.
RUNTIME_FIELDS = {"out_dir", "data_dir", "download", "device", "num_workers", "log_every", "save_every", "overwrite",
                  "allow_changes", "compile", "provenance"}
CHECKPOINT_KEYS = ("format", "args", "step", "model", "optimizer", "scaler", "rng", "epoch_sums",
                   "low_std_epochs", "elapsed")
FORMAT = "isoloss-train-2"  # 2: the readout joined the main optimiser (its param groups changed)
RUN_FILES = ("last.pt", "metrics.jsonl", "config.json", "eigenvalues.png", "online_readout.png", "backbone.pt",
             "backbone.json")


# --- Resuming ---------------------------------------------------------------------------------


def settings_diff(old: dict, new: dict) -> list[str]:
    keys = (old.keys() | new.keys()) - RUNTIME_FIELDS
    return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
            for k in sorted(keys) if old.get(k) != new.get(k)]


def open_run(out: Path, settings: dict) -> dict | None:
    """The checkpoint to resume from, or None for a fresh run; refuses a run with other settings.
    Reads only: nothing is written before every check has passed."""
    if settings["overwrite"]:
        return None
    ckpt, previous = None, None
    if (out / "last.pt").exists():
        try:
            ckpt = common.load_checkpoint(out / "last.pt")
        except common.CheckpointError as e:
            common.die(f"{e} (or pass --overwrite to start this run afresh)")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing or ckpt["format"] != FORMAT:
            common.die(f"{out / 'last.pt'}: not a checkpoint of this version of the training scripts (missing "
                       f"{', '.join(missing) or 'format'}); move it away or pass --overwrite to start afresh")
        previous = ckpt["args"]
    elif (out / "config.json").exists():  # a run that stopped before its first checkpoint
        try:
            previous = json.loads((out / "config.json").read_text())
        except (OSError, ValueError) as e:
            common.die(f"{out / 'config.json'}: unreadable ({e}); move it away or pass --overwrite")
    if previous is not None and (diff := settings_diff(previous, settings)) and not settings["allow_changes"]:
        common.die(f"{out} holds a run with other settings ({'; '.join(diff)}): use another --out-dir, "
                   "--overwrite to start afresh, or --allow-changes to resume with the new settings")
    return ckpt


def restore(ckpt: dict, parts: dict, out: Path) -> None:
    """Load the state of each part (model, optimisers, scaler) and the RNG; one line if they do not fit."""
    try:
        for key, part in parts.items():
            part.load_state_dict(ckpt[key])
    except (RuntimeError, ValueError, KeyError) as e:
        common.die(f"{out / 'last.pt'}: does not fit this model ({str(e).splitlines()[0]}); "
                   "use another --out-dir or --overwrite")
    torch.set_rng_state(ckpt["rng"]["torch"])


def start(out: Path, settings: dict, step: int) -> None:
    """Every check has passed: write config.json, and cut metrics.jsonl back to the checkpoint's step
    (lines a killed run wrote after its last checkpoint will be written again, identically)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*(out / n for n in RUN_FILES if settings["overwrite"]), *out.glob(".*.tmp")]:  # .tmp: a killed save
        stale.unlink(missing_ok=True)
    common.atomic_write_text(out / "config.json", json.dumps(dict(settings, provenance=provenance()), indent=1) + "\n")
    kept = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] <= step]
    common.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def provenance() -> dict:
    """What produced a run: the repository's git commit (and whether the tree had changes), the versions,
    the machine. Written into config.json and backbone.json; never compared when resuming."""
    import platform
    import subprocess
    import torchvision

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=Path(__file__).parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    return dict(git_commit=commit,
                git_dirty=None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no")),
                torch=torch.__version__, torchvision=torchvision.__version__, python=platform.python_version(),
                cpu=common.cpu_info()[0], gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                started=time.strftime("%Y-%m-%d %H:%M:%S %z"))


def save(out: Path, settings: dict, step: int, parts: dict, **state) -> None:
    """last.pt, atomically: the settings, the step, every part's state, the RNG, and `state`."""
    common.atomic_save(dict(format=FORMAT, args=settings, step=step, **{k: p.state_dict() for k, p in parts.items()},
                            rng=dict(torch=torch.get_rng_state()), **state), out / "last.pt")


def export_backbone(backbone: nn.Module, out: Path, **meta) -> None:
    """backbone.pt: a plain state_dict (torchvision names, no fc); backbone.json says how to build it."""
    common.atomic_save({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()},
                       out / "backbone.pt")
    common.atomic_write_text(out / "backbone.json",
                             json.dumps(dict(arch="resnet18", **meta, provenance=provenance()), indent=1) + "\n")
    print(f"done: {out / 'backbone.pt'} (plain torchvision ResNet-18 state_dict), metrics in {out / 'metrics.jsonl'}")


def finish(*loaders) -> None:
    """The end of a run: stop the worker processes of persistent loaders now (left to the garbage
    collector, which may find them only late, each one waits out a 5 s timeout before it exits);
    under torchrun, wait for every rank and leave the process group."""
    for loader in loaders:
        # torch keeps a persistent loader's iterator in _iterator (private: if it moves, gc stops the workers)
        shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
            loader._iterator = None
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --- Faults -----------------------------------------------------------------------------------


def stopped_message(out: Path) -> str:
    try:
        where = (f"the last good checkpoint is {out / 'last.pt'} "
                 f"(step {common.load_checkpoint(out / 'last.pt')['step']})")
    except common.CheckpointError:
        where = "no checkpoint was written yet"
    return (f"The run stopped; {where}. Lower --lr or turn --amp off, and rerun with --allow-changes to resume "
            "from it (the same settings would reach the same fault again).")


def check_finite(bad_step: torch.Tensor, model: nn.Module | None, step: int, out: Path) -> None:
    """Stop on NaN/Inf in any loss so far (bad_step: the first bad step, -1 if none) and, before a save,
    in the weights of `model`: one host sync."""
    bad = bad_step.clone()
    if dist.is_initialized():  # every rank must stop together, or the others would hang
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if int(bad) >= 0:
        common.die(f"NaN or Inf in the loss at step {int(bad)}. {stopped_message(out)}")
    if model is not None and not torch.stack([t.isfinite().all() for t in model.state_dict().values()
                                              if t.is_floating_point()]).all():
        common.die(f"NaN or Inf in the weights after step {step}, not saved. {stopped_message(out)}")


# --- Several processes ------------------------------------------------------------------------


def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun one process per device, NCCL on GPUs, gloo on CPUs."""
    device = common.pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def gather(t: torch.Tensor) -> torch.Tensor:
    """The rows of every rank (under torch.distributed), concatenated in rank order, on the CPU."""
    if not dist.is_initialized():
        return t.cpu()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


def average_batchnorm_statistics(model: nn.Module) -> None:
    """Without SyncBatchNorm (CPUs) each rank's running statistics follow its own batches; average them."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for b in (m.running_mean, m.running_var):
                dist.all_reduce(b)
                b.div_(dist.get_world_size())


# --- Metrics and figures ----------------------------------------------------------------------


def epoch_record(learner: nn.Module, epoch: int, step: int, epoch_sums: torch.Tensor, n_steps: int, health: dict,
                 **extra) -> dict:
    """One line of metrics.jsonl: the losses and std_normalized_z (training batches) as means over the epoch's
    steps and ranks, `evaluate`'s numbers, and the eigenvalues (ascending) of the running uncentred C.
    epoch_sums holds the sums over the epoch's n_steps steps, by position: the SSL loss, the cosine loss, the
    readout loss and the std of l2-normalised z (the training scripts' epoch_sums)."""
    ssl, cosine, ce, std = (epoch_sums / max(n_steps, 1)).tolist()
    s = torch.linalg.eigvalsh(learner.correlation())
    record = dict(epoch=epoch, step=step, loss=ssl, cosine_loss=cosine, readout_loss=ce, std_normalized_z=std, **health,
                  eigenvalues=s.tolist(), participation_ratio=common.participation_ratio(s), **extra)
    if learner.closed_form:  # how many directions W_P = U diag(s_hat^alpha) U^T lets through, and the gradients
        record["erank_predictor"] = common.effective_rank(torch.linalg.eigvalsh(learner.predictor.W).square())
        record.update(common.mode_gradients(learner.predictor, learner.args.loss, *learner.last_pair))
    if learner.args.predictor == "linear":
        record["eigenvector_alignment"] = common.eigenvector_alignment(learner.predictor.weight,
                                                                       learner.correlation()).tolist()
    return record


def read_metrics(path: Path) -> list[dict]:
    """The lines of metrics.jsonl; a line torn by a kill in the middle of its write is skipped."""
    records = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


_last_plot = [0.0]  # when the figures were last drawn (time.monotonic)


def append_metrics(out: Path, record: dict, epochs: int) -> None:
    """One more line of metrics.jsonl and a summary line printed; the figures are redrawn from the whole
    file after the last epoch and at most once a minute before it (drawing costs about a second)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if record["epoch"] == epochs or time.monotonic() - _last_plot[0] > 60:
        plot(out, read_metrics(out / "metrics.jsonl"))
        _last_plot[0] = time.monotonic()
    health = "" if "erank_z" not in record else (
        f"  online_readout top-1 {record['online_readout_top1']:.2f}%"
        + ("" if record["knn_top1"] is None else f"  k-NN {record['knn_top1']:.2f}%  probe {record['probe_top1']:.2f}%")
        + f"  effective rank z {record['erank_z']:.1f} f {record['erank_f']:.1f}")
    print(f"epoch {record['epoch']}/{epochs}  step {record['step']}  loss {record['loss']:.4f}{health}"
          f"  std(z/|z|) {record['std_normalized_z']:.4f}", flush=True)


def plot(out: Path, records: list[dict]) -> None:
    """eigenvalues.png (the three spectra, log scale, as the paper's Figs. 3, 7, 8) and online_readout.png
    (accuracy, effective rank, the collapse indicator and the mean's share of z), from the records of
    metrics.jsonl (the evaluated epochs for what the evaluation measures)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        rs = [r for r in records if r.get(key) is not None]
        return [r["epoch"] for r in rs], [r[key] for r in rs]
    last = {k: v for r in records for k, v in r.items() if v is not None}  # the latest value of every key
    # A time or a curve from one machine is not one from another: every figure names where it was drawn.
    where = f"{out.name}, on {torch.cuda.get_device_name() if torch.cuda.is_available() else common.cpu_info()[0]}"
    # Fixed margins instead of tight_layout, which measures every text and took most of a run's plotting time.
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2),
                             gridspec_kw=dict(left=0.05, right=0.99, bottom=0.12, top=0.8, wspace=0.25))
    for ax, key, title in zip(axes, ("eigenvalues", "cov_z_eigenvalues", "cov_f_eigenvalues"), (
            f"C = running E[z z^T], uncentred (the predictor's)\nparticipation ratio {last['participation_ratio']:.1f}",
            f"covariance of z, centred (test split, eval mode)\neffective rank {last.get('erank_z', math.nan):.1f}",
            f"covariance of backbone features, centred (test, eval)\n"
            f"effective rank {last.get('erank_f', math.nan):.1f}")):
        epochs, values = series(key)
        if values:
            ax.plot(epochs, torch.tensor(values).clamp_min(1e-12).flip(1).numpy(), ".-", color="tab:blue", lw=0.6, ms=2)
        ax.set(yscale="log", xlabel="epoch", ylabel="eigenvalue")
        ax.set_title(title, fontsize=10)
    fig.suptitle(where, fontsize=9)
    fig.savefig(out / "eigenvalues.png", dpi=100)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2),
                             gridspec_kw=dict(left=0.04, right=0.99, bottom=0.12, top=0.84, wspace=0.25))
    for ax, keys, ylabel, title in zip(
            axes,
            (("online_readout_top1", "knn_top1", "probe_top1"), ("erank_z", "erank_f"), ("std_normalized_z",),
             ("mean_share_z",)),
            ("accuracy (%)", "effective rank (RankMe)", "std of z/|z|", "|E z|^2 / E|z|^2"),
            ("test split, eval mode", "centred covariance (test split, eval mode)",
             "collapse indicator (training batches)", "share of the mean in z (test split, eval mode)")):
        for key in keys:
            epochs, values = series(key)
            if values:
                ax.plot(epochs, values, "o-", label=key)
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
    axes[2].axhline(1 / math.sqrt(len(last["eigenvalues"])), color="gray", ls="--", label="healthy 1/sqrt(d)")
    for ax in axes:
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(where, fontsize=9)
    fig.savefig(out / "online_readout.png", dpi=100)
    plt.close("all")
