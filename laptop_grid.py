"""The paper's deep grid at laptop scale, on real images that need no download: scikit-learn's digits.

    python laptop_grid.py                       # every method, with and without EMA, 3 seeds; ~50 min on 2 cores
    python laptop_grid.py --seeds 0             # one seed: a third of the time
    python laptop_grid.py --methods isoloss directpred --targets no-ema

Each run is the laptop preset of a training script with the method's predictor and loss, and
nothing else changed: `python train_byol.py cpu-demo --predictor P [--isoloss] --seed S` (with the
EMA target) or `python train_simsiam.py cpu-demo ...` (without), then `python linear_eval.py` on
its backbone. Rows: {BYOL/SimSiam MLP predictor, DirectPred, DirectCopy, IsoLoss, IsoLoss with the
DirectCopy spectrum} x {with EMA, without}, the two collapse ablations (no predictor, no
stop-gradient; without EMA), and two references: the same backbone at random initialisation (one
per seed) and the raw pixels.

Written to --out-dir (default runs/laptop_grid/): grid.md (the table: mean and spread over seeds),
grid.json (every number of every run), knn_by_epoch.png (the k-NN monitor per epoch, mean over
seeds, shaded min to max), and one run directory per run. Runs that finished are not run again
(the training scripts resume; linear_eval.py caches features), so an interrupted grid continues
where it stopped when the same command is run again.

Columns: k-NN and offline linear top-1 (linear_eval.py: cosine k-NN with k = 20; L-BFGS logistic
regression on standardised features) on the 497 test images; effective rank (RankMe) of the
centred covariance of the projector outputs z and of the backbone features, and std(z/|z|) (the
training-batch collapse indicator, healthy 1/sqrt(d)), from the last epoch of metrics.jsonl; and
the wall time of the training run (runs share the cores: --jobs at a time, one thread each).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

REPO = Path(__file__).resolve().parent
Method = Literal["mlp", "directpred", "directcopy", "isoloss", "isoloss-directcopy", "no-predictor", "no-stop-grad"]
# method: (label, overrides of the cpu-demo preset)
METHODS = {
    "mlp": ("BYOL / SimSiam (MLP predictor)", ["--predictor", "mlp", "--no-isoloss"]),
    "directpred": ("DirectPred", ["--predictor", "directpred", "--no-isoloss"]),
    "directcopy": ("DirectCopy", ["--predictor", "directcopy", "--no-isoloss"]),
    "isoloss": ("IsoLoss (DirectPred spectrum)", ["--predictor", "directpred", "--isoloss"]),
    "isoloss-directcopy": ("IsoLoss (DirectCopy spectrum)", ["--predictor", "directcopy", "--isoloss"]),
    "no-predictor": ("ablation: no predictor", ["--predictor", "none", "--no-isoloss"]),
    "no-stop-grad": ("ablation: no stop-gradient", ["--predictor", "mlp", "--no-isoloss", "--no-stop-grad"]),
}
TARGETS = {"ema": "train_byol.py", "no-ema": "train_simsiam.py"}


@dataclass
class Args:
    out_dir: str = "runs/laptop_grid"
    """where the table, the figure and the run directories go"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of every row (the spread in the table is over these)"""
    methods: tuple[Method, ...] = tuple(METHODS)
    """rows to run (the ablations run without EMA only)"""
    targets: tuple[Literal["ema", "no-ema"], ...] = ("ema", "no-ema")
    """with the EMA target (train_byol.py), without (train_simsiam.py), or both"""
    jobs: int = 2
    """training runs at a time, one thread each (2 on a 2-core machine)"""
    epochs: int | None = None
    """override the preset's epochs (a quick look; the table then says so)"""


def cpu_name() -> str:
    import common
    return common.cpu_info()[0]


def runs(args: Args) -> list[dict]:
    """Every training run of the grid: its row, seed, command and run directory."""
    out = []
    for method in args.methods:
        for target in args.targets:
            if method.startswith("no-") and target == "ema":
                continue  # the collapse ablations are SimSiam's (METHOD.md section 1)
            for seed in args.seeds:
                run_dir = Path(args.out_dir) / f"{target}-{method}-s{seed}"
                cmd = [sys.executable, TARGETS[target], "cpu-demo", *METHODS[method][1], "--seed", str(seed),
                       "--out-dir", str(run_dir), "--log-every", "1000"]
                cmd += ["--epochs", str(args.epochs)] if args.epochs else []
                out.append(dict(method=method, target=target, seed=seed, dir=run_dir, cmd=cmd))
    return out


def execute(todo: list[dict], jobs: int, keep_going: bool = False) -> None:
    """Run each job's commands in order, `jobs` jobs at a time, one thread each; a failed command stops
    the grid with the end of its log, or with keep_going, ends that job only (job["failed"]: its last line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running, t0, done = list(todo), [], time.perf_counter(), 0
    while pending or running:
        while pending and len(running) < jobs:
            job = pending.pop(0)
            job["dir"].mkdir(parents=True, exist_ok=True)
            job["log"], job["start"], job["queue"] = open(job["dir"] / "log.txt", "a"), time.perf_counter(), list(job["cmds"])
            job["proc"] = subprocess.Popen(job["queue"].pop(0), cwd=REPO, env=env, stdout=job["log"], stderr=subprocess.STDOUT)
            running.append(job)
        time.sleep(0.5)
        for job in [j for j in running if j["proc"].poll() is not None]:
            if job["proc"].returncode != 0 and keep_going:
                job["failed"], job["queue"] = (job["dir"] / "log.txt").read_text().splitlines()[-1], []
                print(f"  failed: {job['dir'].name}: {job['failed']}", flush=True)
            elif job["proc"].returncode != 0:
                tail = (job["dir"] / "log.txt").read_text().splitlines()[-5:]
                raise SystemExit(f"error: {' '.join(map(str, job['proc'].args))} failed (log: {job['dir'] / 'log.txt'}):\n"
                                 + "\n".join(tail))
            if job["queue"]:
                job["proc"] = subprocess.Popen(job["queue"].pop(0), cwd=REPO, env=env, stdout=job["log"],
                                               stderr=subprocess.STDOUT)
                continue
            running.remove(job)
            job["log"].close()
            done += 1
            rate = (time.perf_counter() - t0) / done
            print(f"  {done:>3}/{len(todo)}  {job['dir'].name:<34} {time.perf_counter() - job['start']:6.1f} s   "
                  f"ETA {rate * (len(todo) - done) / 60:5.1f} min", flush=True)


def evaluate_random_init(folder: Path, seed: int, width: float, crop: int, **linear_eval_args) -> dict:
    """linear_eval.py on the backbone a training run with `seed` starts from (the training scripts seed,
    then build the backbone first), saved as folder/backbone.pt; its linear_eval.json goes beside it."""
    import torch
    import common
    import linear_eval as L
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    common.atomic_save(common.resnet18(width, common.uses_small_stem(crop)).state_dict(), folder / "backbone.pt")
    return L.main(L.Args(checkpoint=str(folder / "backbone.pt"), num_workers=0, crop=crop, **linear_eval_args))


def references(args: Args) -> dict:
    """The same backbone at random initialisation (one per seed, as each run starts) and the raw pixels,
    evaluated with linear_eval.py's protocol."""
    import torch
    import common
    import data as D
    import linear_eval as L
    import train_simsiam as S
    torch.set_num_threads(args.jobs)
    preset = S.PRESETS["cpu-demo"][1]
    crop = preset.crop or D.CROP_SIZE["digits"]
    out = {}
    for seed in args.seeds:
        out[seed] = evaluate_random_init(Path(args.out_dir) / f"random-init-s{seed}", seed, preset.width, crop, dataset="digits")
    view = D.eval_transform("digits", crop)
    (x, y), (xt, yt) = ((torch.stack([view(im) for im, _ in ds]).flatten(1), torch.tensor(ds.targets))
                        for ds in (D.load_dataset("digits", "", split) for split in ("train", "test")))
    lin = L.Args(checkpoint="", dataset="digits")
    best, _ = L.select_hyperparameters(x, y, 10, lin)
    readout = L.fit_readout(x, y, 10, "lbfgs", None, best["wd"], lin)
    with torch.no_grad():
        linear = common.topk_accuracy(readout(xt), yt, ks=(1,))[0]
    knn = common.topk_accuracy(common.knn_scores(x, y, xt, 10, 20), yt, ks=(1,))[0]
    out["pixels"] = dict(knn=dict(results={"k=20": dict(top1=knn)}), offline_linear=dict(top1=linear))
    return out


def collect(job: dict) -> dict:
    """A run's numbers: linear_eval.json and the last line (and the k-NN per epoch) of metrics.jsonl."""
    lin = json.loads((job["dir"] / "linear_eval.json").read_text())
    records = [json.loads(line) for line in (job["dir"] / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return dict(method=job["method"], target=job["target"], seed=job["seed"], knn=100 * lin["knn"]["results"]["k=20"]["top1"],
                linear=100 * lin["offline_linear"]["top1"], erank_z=last["erank_z"], erank_f=last["erank_f"],
                std=last["std_normalized_z"], healthy_std=1 / math.sqrt(len(last["eigenvalues"])),
                seconds=last["wall_time_s"], knn_by_epoch=[[r["epoch"], r["knn_top1"]] for r in records if r.get("knn_top1")],
                mean_share_z=last["mean_share_z"], collapse_warning=last["collapse_warning"])


def summary(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3g}" if len(v) == 1 else f"{v.mean():.3g} ± {v.std(ddof=1):.2g}"


def table(results: list[dict], refs: dict, args: Args, minutes: float) -> str:
    rows = ["| method | EMA target | k-NN top-1 | linear top-1 | eff. rank z | eff. rank f | std(z/\\|z\\|) "
            "| k-NN at the first evaluation | train time (s) |", "|" + "---|" * 9]
    for method in args.methods:
        for target in args.targets:
            rs = [r for r in results if r["method"] == method and r["target"] == target]
            if rs:
                rows.append(f"| {METHODS[method][0]} | {'with' if target == 'ema' else 'without'} | "
                            + " | ".join(summary([r[k] for r in rs]) for k in ("knn", "linear", "erank_z", "erank_f", "std"))
                            + f" | {summary([r['knn_by_epoch'][0][1] for r in rs])} | {summary([r['seconds'] for r in rs])} |")
    seeds = [s for s in args.seeds]
    rows.append("| random init (same backbone) | - | " + summary([100 * refs[s]["knn"]["results"]["k=20"]["top1"] for s in seeds])
                + " | " + summary([100 * refs[s]["offline_linear"]["top1"] for s in seeds]) + " | - | - | - | - | - |")
    rows.append(f"| raw pixels | - | {100 * refs['pixels']['knn']['results']['k=20']['top1']:.3g} | "
                f"{100 * refs['pixels']['offline_linear']['top1']:.3g} | - | - | - | - | - |")
    d = results[0]["healthy_std"] if results else float("nan")
    return "\n".join([
        f"Laptop grid on scikit-learn's digits (1,300 train / 497 test images), `python laptop_grid.py"
        f"{'' if args.epochs is None else f' --epochs {args.epochs}'}`: {len(seeds)} seed(s) per row "
        f"(mean ± standard deviation), {minutes:.0f} min on {cpu_name()}. Healthy std(z/|z|) = 1/sqrt(d) = {d:.3f}.", "",
        *rows])


def figure(results: list[dict], refs: dict, args: Args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.targets), figsize=(6.5 * len(args.targets), 4.5), squeeze=False, sharey=True)
    chance = np.mean([100 * refs[s]["knn"]["results"]["k=20"]["top1"] for s in args.seeds])
    for ax, target in zip(axes[0], args.targets):
        for i, method in enumerate(args.methods):
            rs = [r for r in results if r["method"] == method and r["target"] == target]
            if not rs:
                continue
            epochs = np.array([e for e, _ in rs[0]["knn_by_epoch"]])
            curves = np.array([[k for _, k in r["knn_by_epoch"]] for r in rs])
            ax.plot(epochs, curves.mean(0), "o-", ms=3, color=f"C{i}", label=METHODS[method][0])
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=f"C{i}", alpha=0.15)
        ax.axhline(chance, color="gray", ls="--", label="same backbone at random init")
        ax.set(xlabel="epoch", title=f"{'with' if target == 'ema' else 'without'} EMA target ({TARGETS[target]})")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("k-NN top-1 on the test split (%)")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(f"laptop grid on digits, {len(args.seeds)} seed(s): mean, min to max shaded ({cpu_name()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> list[dict]:
    if args.jobs < 1 or not args.seeds or (args.epochs is not None and args.epochs < 1):
        raise SystemExit("error: --jobs and --epochs must be >= 1 and --seeds must name at least one seed")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = runs(args)
    for job in todo:
        job["cmds"] = [job["cmd"], [sys.executable, "linear_eval.py", "--checkpoint", str(job["dir"] / "backbone.pt"),
                                    "--dataset", "digits", "--num-workers", "0"]]
    fresh = [j for j in todo if not (j["dir"] / "linear_eval.json").exists()]
    print(f"laptop grid: {len(todo)} runs ({len(todo) - len(fresh)} done already), {args.jobs} at a time, on {cpu_name()}",
          flush=True)
    execute(fresh, args.jobs)
    results = [collect(j) for j in todo]
    refs = references(args)
    minutes = (time.perf_counter() - t0) / 60
    text = table(results, refs, args, minutes)
    (out / "grid.md").write_text(text + "\n")
    (out / "grid.json").write_text(json.dumps(dict(runs=[{k: v for k, v in r.items()} for r in results],
                                                   references={str(k): v for k, v in refs.items()},
                                                   cpu=cpu_name(), minutes=minutes, args=vars(args)), indent=1) + "\n")
    figure(results, refs, args, out / "knn_by_epoch.png")
    print("\n" + text + f"\n\nwrote {out / 'grid.md'}, {out / 'grid.json'}, {out / 'knn_by_epoch.png'}")
    return results


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args, description=__doc__))
