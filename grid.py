"""The paper's grid (its Table 1) with one command, at any scale: it trains every run that is missing,
evaluates each backbone with linear_eval.py, and writes the table.

    python grid.py                                   # the laptop grid: Fashion-MNIST, 12 runs (~75 min on 2 cores)
    python grid.py --dataset cifar10 --dry-run       # Table 1 on CIFAR-10: every run, its command, its time
    python grid.py --dataset cifar10 --gpus 0,1,2,3  # ... run it, one run per GPU
    python grid.py --dataset cifar10 cifar100 stl10 tinyimagenet --seeds 0 1 2 --gpus 0,1,2,3,4,5,6,7
    python grid.py --dataset cifar10 --gpus 0,1,2,3 --gpus-per-run 4   # one run at a time on all four (torchrun)

Rows: BYOL / SimSiam (MLP predictor), DirectPred, DirectCopy, IsoLoss with the DirectPred spectrum and
with the DirectCopy spectrum, each with the EMA target (train_byol.py) and without (train_simsiam.py);
the two collapse ablations (without EMA only); and the same backbone at random initialisation. Each
run is one command: the training script's `laptop` preset (--scale laptop, the default for
Fashion-MNIST and digits) or its paper preset (`byol` / `simsiam`, the paper's settings, the default
for the other data sets) with the row's predictor and loss and nothing else changed, then
`linear_eval.py` on its backbone.

Resuming: a run with its linear_eval.json is done and not run again; an unfinished one resumes from
its last.pt (the end of its last epoch); so after a kill at any moment the same command continues.

Written: the run directories under --runs-dir (default runs/DATASET-SCALE/, shared with
paper_figures.py, which draws the spectra of the same runs), and under --results-dir (default
results/GRID/, small files meant to be committed): grid.md (the table in the paper's form, then every
run's health), grid.json (every number, every command, the machine, the date and the commit) and
knn.png (the k-NN monitor per evaluation).

Columns: online readout top-1 (the linear classifier trained beside the network, the paper's metric;
at the last evaluation), offline linear top-1 and cosine k-NN top-1 (k = 20) from linear_eval.py,
mean and standard deviation over --seeds; published numbers where they exist, with their source.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

import slurm as SL

REPO = Path(__file__).resolve().parent
# row: (label, the options that make it, on top of a preset)
ROWS = {
    "mlp": ("BYOL / SimSiam (MLP predictor)", ["--predictor", "mlp", "--no-isoloss"]),
    "directpred": ("DirectPred", ["--predictor", "directpred", "--no-isoloss"]),
    "directcopy": ("DirectCopy", ["--predictor", "directcopy", "--no-isoloss"]),
    "isoloss": ("IsoLoss (DirectPred spectrum)", ["--predictor", "directpred", "--isoloss"]),
    "isoloss-directcopy": ("IsoLoss (DirectCopy spectrum)", ["--predictor", "directcopy", "--isoloss"]),
    "no-predictor": ("ablation: no predictor", ["--predictor", "none", "--no-isoloss"]),
    "no-stop-grad": ("ablation: no stop-gradient", ["--predictor", "mlp", "--no-isoloss", "--no-stop-grad"]),
    "linear": ("learnable linear predictor", ["--predictor", "linear", "--no-isoloss"]),  # Fig. 4's, not Table 1's
}
TABLE1_ROWS = tuple(row for row in ROWS if row != "linear")
ABLATIONS = ("no-predictor", "no-stop-grad")  # SimSiam's (METHOD.md section 1): without the EMA target only
# Table 1's weight decay (METHOD.md section 6): the release's run_experiments.sh passes 1e-4 to every closed-form
# row, with and without EMA; BYOL, SimSiam (and so their ablations) keep its configs' 1e-5. The figures keep 1e-5.
CLOSED_FORM_ROWS = ("directpred", "directcopy", "isoloss", "isoloss-directcopy")
TABLE1_WEIGHT_DECAY = {row: 1e-4 if row in CLOSED_FORM_ROWS else 1e-5 for row in ROWS}
Row = Literal["mlp", "directpred", "directcopy", "isoloss", "isoloss-directcopy", "no-predictor", "no-stop-grad",
              "linear"]
Dataset = Literal["cifar10", "cifar100", "stl10", "tinyimagenet", "fashionmnist", "digits"]
# Images a pretraining epoch draws from ('pretrain' split: STL-10's train + unlabeled) and classes.
TRAIN_IMAGES = {"cifar10": (50_000, 10), "cifar100": (50_000, 100), "stl10": (105_000, 10),
                "tinyimagenet": (100_000, 200), "fashionmnist": (60_000, 10), "digits": (1_300, 10)}
# Online readout top-1 of the same methods elsewhere: solo-learn's README (ResNet-18, 1,000 epochs).
PUBLISHED = {("mlp", "ema", "cifar10"): 92.6, ("mlp", "ema", "cifar100"): 70.5,
             ("mlp", "no-ema", "cifar10"): 90.5, ("mlp", "no-ema", "cifar100"): 66.0}
PUBLISHED_SOURCE = "solo-learn's README (github.com/vturrisi/solo-learn), ResNet-18, 1,000 epochs, online readout"
# One train_byol.py step on an NVIDIA H200 (BYOL preset, CIFAR-10, batch 256, bf16, channels_last):
# 41-45 ms measured; other configurations are scaled from it by their FLOPs.
H200_STEP_S = 0.043
# Two PIL views of a 32 x 32 image per second on one loader worker (one Xeon core; bench.py's data section).
LOADER_PAIRS_PER_S = 591


@dataclass
class Args:
    dataset: tuple[Dataset, ...] = ("fashionmnist",)
    """data set(s): the table has a with / without EMA column pair for each"""
    scale: Literal["auto", "laptop", "paper"] = "auto"
    """laptop: the scripts' `laptop` preset; paper: the paper's settings; auto: laptop for fashionmnist and digits"""
    rows: tuple[Row, ...] = TABLE1_ROWS
    """the table's rows (the ablations run without EMA only)"""
    targets: tuple[Literal["ema", "no-ema"], ...] = ("ema", "no-ema")
    """with the EMA target (train_byol.py), without (train_simsiam.py), or both"""
    seeds: tuple[int, ...] = (0,)
    """seeds of every row: the table gives mean and standard deviation over them"""
    epochs: int | None = None
    """override the presets' epochs (a quick look: the table says so)"""
    train_args: str = ""
    """more options for every training run, e.g. "--batch-size 128" (recorded in grid.json)"""
    data_dir: str = "data"
    """passed to the training scripts and linear_eval.py"""
    download: bool = False
    """the data step first: download every data set of the grid into --data-dir once, before any run starts"""
    gpus: str = ""
    """GPU indices to use, e.g. "0,1,2,3" (empty: the CPU)"""
    gpus_per_run: int = 1
    """GPUs of one run: more than 1 starts it under torchrun (--batch-size stays the global batch)"""
    jobs: int = 2
    """on the CPU: runs at a time, each with cores / jobs threads (2 on a 2-core machine)"""
    runs_dir: str = "runs"
    """run directories go to RUNS_DIR/DATASET-SCALE/"""
    results_dir: str = ""
    """where grid.md, grid.json and knn.png go (default results/DATASETS-SCALE)"""
    dry_run: bool = False
    """print the runs, their commands and the estimated time (with --slurm: the jobs and the sbatch script),
    then stop"""
    time_steps: int = 2
    """training steps timed per configuration for the estimate (0: no timing here)"""
    collect: bool = False
    """start no run: the table from the runs finished so far (after a SLURM array, say), the others listed"""
    cluster: Annotated[SL.SlurmOptions, tyro.conf.OmitArgPrefixes] = SL.SlurmOptions()
    """--slurm and its options: the runs as one SLURM job array instead of here (slurm.py)"""


# --- The plan ----------------------------------------------------------------------------------


def scale_of(args: Args) -> str:
    laptop = {d in ("fashionmnist", "digits") for d in args.dataset}
    if args.scale == "auto" and len(laptop) > 1:
        raise SystemExit("error: --dataset mixes laptop data sets (fashionmnist, digits) with the paper's; "
                         "give --scale laptop or --scale paper")
    return args.scale if args.scale != "auto" else "laptop" if laptop == {True} else "paper"


def run_name(row: str, loss: str = "cosine", ema: bool = True, wd: float = 1e-5, seed: int = 0, raw: bool = False,
             epochs: int | None = None) -> str:
    """A run's directory name: the same run has the same name in the grid and in paper_figures.py (raw: W_P from
    C's own eigenvalues, --no-normalize-spectrum; epochs: other than the preset's)."""
    return (f"{loss}-{row}-{'ema' if ema else 'noema'}" + ("" if wd == 1e-5 else f"-wd{wd:g}") + ("-raw" if raw else "")
            + (f"-{epochs}ep" if epochs else "") + f"-s{seed}")


def train_command(row: str, ema: bool, scale: str, dataset: str, data_dir: str, run_dir: Path, seed: int = 0,
                  loss: str = "cosine", wd: float = 1e-5, extra: str = "", raw: bool = False) -> list[str]:
    """The training script and its arguments for one run (no interpreter: launch() adds it)."""
    script = "train_byol.py" if ema else "train_simsiam.py"
    preset = "laptop" if scale == "laptop" else "byol" if ema else "simsiam"
    return [script, preset, *ROWS[row][1], *(["--no-normalize-spectrum"] if raw else []), "--loss", loss,
            "--weight-decay", f"{wd:g}", "--dataset", dataset, "--data-dir", data_dir, "--out-dir", str(run_dir),
            "--log-every", "1000", "--seed", str(seed), *shlex.split(extra)]


def eval_command(run_dir: Path, dataset: str, data_dir: str) -> list[str]:
    return ["linear_eval.py", "--checkpoint", str(run_dir / "backbone.pt"), "--dataset", dataset,
            "--data-dir", data_dir, "--num-workers", "0"]


def plan(args: Args) -> list[dict]:
    """Every run of the grid: its row, target, data set, seed, directory and two commands (train, evaluate)."""
    scale, extra = scale_of(args), args.train_args + ("" if args.epochs is None else f" --epochs {args.epochs}")
    out = []
    for dataset in args.dataset:
        for row in args.rows:
            for target in args.targets:
                if row in ABLATIONS and target == "ema":
                    continue
                for seed in args.seeds:
                    wd, ema = TABLE1_WEIGHT_DECAY[row], target == "ema"
                    run_dir = Path(args.runs_dir) / f"{dataset}-{scale}" / run_name(row, ema=ema, wd=wd, seed=seed)
                    out.append(dict(row=row, target=target, dataset=dataset, seed=seed, dir=run_dir, weight_decay=wd,
                                    cmds=[train_command(row, ema, scale, dataset, args.data_dir, run_dir, seed, wd=wd,
                                                        extra=extra), eval_command(run_dir, dataset, args.data_dir)]))
    return out


# --- Running: resumable, a few runs at a time ---------------------------------------------------


def _child_setup(cores: list[int]) -> None:
    """In the child, before exec: on Linux, end when the grid ends, so a killed grid leaves no run behind
    that a second grid would start again beside it; and stay on this run's share of the cores."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if cores:
        os.sched_setaffinity(0, cores)


def slots(gpus: str, per_run: int, jobs: int) -> list[dict]:
    """The environment of each concurrent run: its GPUs ("0,1,..."), or its share of the CPU's threads."""
    if not gpus:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * jobs
    gpus, k = [g.strip() for g in gpus.split(",") if g.strip()], per_run
    if k < 1 or len(gpus) < k:
        raise SystemExit(f"error: --gpus-per-run {k} needs at least {k} GPUs in --gpus, got {len(gpus)}")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i:i + k])} for i in range(0, len(gpus) - k + 1, k)]


def slot_cores(n: int) -> list[list[int]]:
    """This machine's cores split evenly over n concurrent runs: each run's threads and loader workers stay in its
    share (the training scripts size their loaders by it). Empty where the system cannot pin processes."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    k = len(cores) // n
    return [cores[i * k:(i + 1) * k] for i in range(n)] if k else [[] for _ in range(n)]


def fetch_data(datasets, data_dir: str) -> None:
    """The data step, once before any run starts, so that runs starting together never download side by side."""
    import data
    for dataset in datasets:
        try:
            data.fetch(dataset, data_dir)
        except data.DataError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"data: {dataset} ready in {data_dir}", flush=True)


def launch(cmd: list[str], gpus_per_run: int) -> list[str]:
    """The command line of one script: the interpreter, or torchrun for a training run on several GPUs."""
    if cmd[0].startswith("train_") and gpus_per_run > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_run}", *cmd]
    return [sys.executable, *cmd]


def execute(todo: list[dict], envs: list[dict], gpus_per_run: int = 1, keep_going: bool = False) -> None:
    """Run each job's commands in order, one job per slot of `envs`. A failed command stops the grid
    with the end of its log, or with keep_going, ends that job only (job["failed"]: its last line)."""
    pending, running, free, t0, done = list(todo), [], list(range(len(envs))), time.perf_counter(), 0
    cores = slot_cores(len(envs))

    def start(job):
        job["proc"] = subprocess.Popen(launch(job["queue"].pop(0), gpus_per_run), cwd=REPO,
                                       env={**os.environ, **envs[job["slot"]]},
                                       stdout=job["log"], stderr=subprocess.STDOUT,
                                       preexec_fn=functools.partial(_child_setup, cores[job["slot"]]))

    while pending or running:
        while pending and free:
            job = pending.pop(0)
            job["dir"].mkdir(parents=True, exist_ok=True)
            job["log"], job["start"], job["queue"], job["slot"] = (
                open(job["dir"] / "log.txt", "a"), time.perf_counter(), list(job["cmds"]), free.pop(0))
            start(job)
            running.append(job)
        time.sleep(0.5)
        for job in [j for j in running if j["proc"].poll() is not None]:
            if job["proc"].returncode != 0 and keep_going:
                job["failed"], job["queue"] = (job["dir"] / "log.txt").read_text().splitlines()[-1], []
                print(f"  failed: {job['dir'].name}: {job['failed']}", flush=True)
            elif job["proc"].returncode != 0:
                tail = (job["dir"] / "log.txt").read_text().splitlines()[-5:]
                raise SystemExit(f"error: {' '.join(map(str, job['proc'].args))} failed "
                                 f"(log: {job['dir'] / 'log.txt'}):\n" + "\n".join(tail))
            if job["queue"]:
                start(job)
                continue
            running.remove(job)
            free.append(job["slot"])
            job["log"].close()
            done += 1
            rate = (time.perf_counter() - t0) / done
            print(f"  {done:>3}/{len(todo)}  {job['dir'].parent.name}/{job['dir'].name:<34} "
                  f"{time.perf_counter() - job['start']:7.1f} s   ETA {rate * (len(todo) - done) / 60:6.1f} min",
                  flush=True)


def evaluate_random_init(folder: Path, seed: int, width: float, crop: int, **linear_eval_args) -> dict:
    """linear_eval.py on the backbone a training run with `seed` starts from (the training scripts seed,
    then build the backbone first), saved as folder/backbone.pt; its linear_eval.json goes beside it."""
    import torch
    import common
    import linear_eval as L
    if (folder / "linear_eval.json").exists():
        return json.loads((folder / "linear_eval.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    common.atomic_save(common.resnet18(width, common.uses_small_stem(crop)).state_dict(), folder / "backbone.pt")
    return L.main(L.Args(checkpoint=str(folder / "backbone.pt"), num_workers=0, crop=crop, **linear_eval_args))


# --- Time, stated before it is spent ------------------------------------------------------------


def run_settings(job: dict):
    """The training script's own Args for a run (its preset with the run's options)."""
    script, *argv = job["cmds"][0]
    return importlib.import_module(script.removesuffix(".py")).parse(argv)


def step_cost(script: str, s, repeats: int) -> tuple[float | None, float]:
    """(seconds per training step on this machine, or None when repeats is 0; FLOPs per step), from the
    script's own model, optimiser and step at its settings `s`, on random views of the run's size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import common
    import data
    module = importlib.import_module(script.removesuffix(".py"))
    device = common.pick_device("auto")
    crop, n_classes = s.crop or data.CROP_SIZE[s.dataset], TRAIN_IMAGES[s.dataset][1]
    torch.manual_seed(0)
    learner = module.Learner(s, n_classes, common.uses_small_stem(crop)).to(device)
    optimizer, scaler = module.make_optimizer(s, learner), torch.amp.GradScaler(device.type, enabled=False)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")  # noqa: E731
    ema = (1.0,) if script == "train_byol.py" else ()

    def step(batch):
        x1, x2 = (torch.randn(batch, 3, crop, crop, device=device) for _ in range(2))
        module.train_step(learner, learner, optimizer, scaler, x1, x2,
                          torch.randint(0, n_classes, (batch,), device=device), autocast, *ema)

    with FlopCounterMode(display=False) as counter:  # at batch 4, then scaled: the convolutions are linear in the batch
        step(4)
    flops = counter.get_total_flops() * s.batch_size / 4
    if not repeats:
        return None, flops
    cuda = device.type == "cuda"
    # a CPU's time is linear in the batch: time less, then scale
    batch = s.batch_size if cuda else min(s.batch_size, 32)
    if cuda:
        step(batch)  # warm-up: cuDNN picks its kernels
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        step(batch)
    torch.cuda.synchronize() if cuda else None
    return (time.perf_counter() - t) / repeats * s.batch_size / batch, flops


def view_seconds(s, path: str, repeats: int) -> float:
    """Seconds to draw one batch of both views on this machine: with PIL on one core (a loader worker's rate), or
    batched on this machine's device; timed on random images of the data set's size, or without timing (repeats 0)
    bench.py's rate for the PIL path (its device path runs on the GPU beside the step and is not counted)."""
    import torch
    from PIL import Image
    import common
    import data
    if not repeats:
        return s.batch_size / LOADER_PAIRS_PER_S if path == "loader" else 0.0
    size, crop = data.CROP_SIZE[s.dataset], s.crop or data.CROP_SIZE[s.dataset]
    blur = s.blur or ((1.0, 0.1) if s.dataset in ("stl10", "imagefolder") else (0.0, 0.0))
    specs = data.view_specs(crop, blur, s.min_scale, grayscale=s.dataset in data.GRAYSCALE)
    n = min(s.batch_size, 32)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    if path == "loader":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a loader worker is one process on one core
        views = data.TwoViews([(Image.fromarray(x.permute(1, 2, 0).numpy()), 0) for x in images],
                              tuple(map(data.pil_view, specs)), 0)
        t = time.perf_counter()
        [views[(0, i)] for i in range(n)]
        torch.set_num_threads(threads)
    else:
        device = common.pick_device("auto")
        list(data.device_views(images.to(device), torch.zeros(n, device=device), specs,
                               [[(0, i) for i in range(n)]], 0))
        torch.cuda.synchronize() if device.type == "cuda" else None
    return (time.perf_counter() - t) * s.batch_size / n


def per_step(step_s: float, views_s: float, path: str, workers: int) -> tuple[float, str]:
    """(seconds per step, what bounds it): loader workers draw the next batches while the model trains, so
    the slower of the two sets the pace; the main process (no workers) or the device itself draws them in turn."""
    if path == "loader" and workers > 0:
        data_s = views_s / workers
        return max(step_s, data_s), f"data ({workers} loader workers)" if data_s > step_s else "steps"
    return step_s + views_s, "data (views drawn in turn)" if views_s > step_s else "steps"


def total_steps(s) -> int:
    """Training steps of a run with the script's settings `s`."""
    return s.epochs * min(TRAIN_IMAGES[s.dataset][0] // s.batch_size, s.steps_per_epoch or sys.maxsize)


def estimate(jobs: list[dict], args: Args) -> tuple[str, float]:
    """The runs, their commands, and the time they will take, data included: timed here (a few steps of each
    configuration and a few batches of its views, with as many threads and cores as a run will have) and, scaled
    by FLOPs, on an H200 (on the device views; the PIL path at bench.py's rate per loader worker). Returns the
    text and the H200 hours still to run."""
    import torch
    import common
    import data
    import train_byol as Tb
    envs, threads = slots(args.gpus, args.gpus_per_run, args.jobs), torch.get_num_threads()
    cores = len(slot_cores(len(envs))[0]) or max(1, (os.cpu_count() or 1) // len(envs))
    cuda_here = common.pick_device("auto").type == "cuda"
    costs, lines, here_total, h200_total, paper = {}, [], 0.0, {}, scale_of(args) == "paper"
    try:  # a run's share of the cores (its OMP_NUM_THREADS) while timing; the caller's afterwards
        torch.set_num_threads(int(envs[0].get("OMP_NUM_THREADS", threads)))
        ref_flops = step_cost("train_byol.py", Tb.parse(["byol", "--dataset", "cifar10"]), 0)[1]
        for job in jobs:
            script, s = job["cmds"][0][0], run_settings(job)
            workers = s.num_workers if s.num_workers is not None else max(0, cores // args.gpus_per_run - 1)
            here_path, gpu_path = (data.views_on(s.augment_on, s.dataset, cuda_here),
                                   data.views_on(s.augment_on, s.dataset, True))
            # the backbone's cost decides: one timing per script and model size, whatever the predictor
            key = (script, s.dataset, s.crop, s.width, s.batch_size, s.proj_hidden, s.proj_dim, s.pred_hidden,
                   here_path)
            if key not in costs:
                costs[key] = *step_cost(script, s, args.time_steps), view_seconds(s, here_path, args.time_steps)
            here, flops, views = costs[key]
            steps = total_steps(s)
            here_step, here_bound = (None, "") if here is None else per_step(here, views, here_path, workers)
            h200_step, h200_bound = per_step(H200_STEP_S * flops / ref_flops, view_seconds(s, gpu_path, 0), gpu_path,
                                             workers)
            done = (job["dir"] / "linear_eval.json").exists()
            here_total += 0 if done or here_step is None else steps * here_step
            h200_total[job["dataset"]] = h200_total.get(job["dataset"], 0.0) + (0 if done else steps * h200_step)
            lines.append(f"  {'done ' if done else '     '}{job['dataset']}/{job['dir'].name:<32} {steps:>7} steps   "
                         f"here {'-' if here_step is None else hours(steps * here_step):>9}"
                         + (f" ({here_path} views; bound by {here_bound})" if here_step is not None else "")
                         + (f"   H200 {hours(steps * h200_step):>9} ({gpu_path} views; bound by {h200_bound})"
                            if paper else "") + "\n"
                         f"        python {shlex.join(job['cmds'][0])}\n        python {shlex.join(job['cmds'][1])}")
    finally:
        torch.set_num_threads(threads)
    return "\n".join([
        f"grid: {len(jobs)} runs ({sum((j['dir'] / 'linear_eval.json').exists() for j in jobs)} done), "
        f"{machine_line(args.gpus, args.gpus_per_run, args.jobs)}",
        *lines,
        f"training still to run: here {'(not timed)' if not args.time_steps else hours(here_total / len(envs))} "
        f"({args.time_steps} timed steps per configuration, {len(envs)} run(s) at a time)"
        + (f"; on one H200 {hours(sum(h200_total.values()))} ("
           + ", ".join(f"{d} {hours(t)}" for d, t in h200_total.items())
           + f"; from its measured {1e3 * H200_STEP_S:.0f} ms "
           f"per BYOL step on CIFAR-10 at batch {Tb.PRESETS['byol'][1].batch_size}, scaled by FLOPs; "
           f"device views there are not counted, the PIL path at {LOADER_PAIRS_PER_S} pairs/s per loader worker)"
           if paper else "")
        + ". Evaluation, checkpoints and linear_eval.py add to it (7-10% of each epoch in the laptop runs)."]), \
        sum(h200_total.values()) / 3600


def machine_line(gpus: str, per_run: int, jobs: int) -> str:
    import torch
    import common
    at_once = f"{len(slots(gpus, per_run, jobs))} run(s) at a time"
    if gpus:
        return (f"GPUs {gpus} ({torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA here'}), "
                f"{at_once}")
    return f"{common.cpu_info()[0]}, {at_once}"


def hours(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


# --- The table ----------------------------------------------------------------------------------


def collect(job: dict) -> dict:
    """A finished run's numbers: linear_eval.json, and from metrics.jsonl the last evaluation and the last epoch."""
    import rundir
    lin = json.loads((job["dir"] / "linear_eval.json").read_text())
    records = rundir.read_metrics(job["dir"] / "metrics.jsonl")
    config = json.loads((job["dir"] / "config.json").read_text())
    last, evaluated = records[-1], [r for r in records if r.get("knn_top1") is not None]
    return dict(row=job["row"], target=job["target"], dataset=job["dataset"], seed=job["seed"], run=job["dir"].name,
                command="python " + shlex.join(job["cmds"][0]), step=last["step"],
                online=evaluated[-1]["online_readout_top1"] if evaluated else None,
                linear=100 * lin["offline_linear"]["top1"], knn=100 * lin["knn"]["results"]["k=20"]["top1"],
                std=last["std_normalized_z"], healthy_std=1 / math.sqrt(len(last["eigenvalues"])),
                erank_z=evaluated[-1]["erank_z"] if evaluated else None,
                mean_share_z=evaluated[-1]["mean_share_z"] if evaluated else None,
                collapse_warning=last["collapse_warning"], train_s=last["wall_time_s"],
                not_steps=1 - sum(r["train_s"] for r in records) / sum(r["epoch_s"] for r in records),
                knn_by_step=[[r["step"], r["knn_top1"]] for r in evaluated], provenance=config.get("provenance"))


def earlier_records(path: Path, jobs: list[dict]) -> dict:
    """The records of `jobs` that the results folder's grid.json already holds (the same run: the same name and
    command), for runs whose directories are not on this machine: a table collected here keeps what was committed
    or made elsewhere. Each is marked with the date of the table it comes from."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    old = {(r["dataset"], r["run"]): r for r in saved["runs"]}
    return {j["dir"].name: {**r, "kept_from": r.get("kept_from", saved["date"])} for j in jobs
            if (r := old.get((j["dataset"], j["dir"].name))) and r["command"] == "python " + shlex.join(j["cmds"][0])}


def summary(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return "-" if not len(v) else f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def table(results: list[dict], refs: dict, args: Args, header: str) -> str:
    """Per data set: rows = methods, columns = with / without EMA x (online readout, offline linear, k-NN);
    then every run's health."""
    out = [header]
    targets = [t for t in ("ema", "no-ema") if t in args.targets]
    for dataset in args.dataset:
        cols = [f"{'with' if t == 'ema' else 'without'} EMA: {m}"
                for t in targets for m in ("online", "linear", "k-NN")]
        published = any(k[2] == dataset for k in PUBLISHED)
        out += ["", f"**{dataset}** (top-1 %, test split)", "",
                "| method | " + " | ".join(cols) + (" | published (online) |" if published else " |"),
                "|" + "---|" * (len(cols) + 1 + published)]
        for row in args.rows:
            cells = []
            for t in targets:
                rs = [r for r in results if (r["row"], r["target"], r["dataset"]) == (row, t, dataset)]
                cells += [summary([r[k] for r in rs]) for k in ("online", "linear", "knn")]
            ref = " / ".join(f"{PUBLISHED[(row, t, dataset)]:.1f}" if (row, t, dataset) in PUBLISHED else "-"
                             for t in targets)
            out.append(f"| {ROWS[row][0]} | " + " | ".join(cells) + (f" | {ref} |" if published else " |"))
        init = [refs[(dataset, s)] for s in args.seeds if (dataset, s) in refs]
        init_cells = ["-", summary([100 * r["offline_linear"]["top1"] for r in init]),
                      summary([100 * r["knn"]["results"]["k=20"]["top1"] for r in init])] * len(targets)
        out.append("| random init (same backbone) | " + " | ".join(init_cells) + (" | - |" if published else " |"))
    if any(k[2] in args.dataset for k in PUBLISHED):
        out += ["", f"Published: {PUBLISHED_SOURCE}; with / without EMA (BYOL / SimSiam)."]
    out += ["", "Every run (last epoch; online readout, eff. rank and mean share at the last evaluation):", "",
            "| run | steps | std(z/\\|z\\|) | eff. rank z | mean share of z | collapse warning "
            "| not training steps | train time |",
            "|" + "---|" * 8]
    for r in results:
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        kept = f" (kept from the table of {r['kept_from']})" if r.get("kept_from") else ""
        out.append(f"| {r['dataset']}/`{r['run']}`{kept} | {r['step']} | {r['std']:.3f} | "
                   f"{fmt(r['erank_z'], '{:.1f}')} | "
                   f"{fmt(r['mean_share_z'], '{:.2f}')} | {'yes' if r['collapse_warning'] else 'no'} | "
                   f"{100 * r['not_steps']:.0f}% | {hours(r['train_s'])} |")
    healthy = sorted({f"{r['healthy_std']:.3f}" for r in results})
    out += ["", f"Healthy std(z/|z|) = 1/sqrt(d) = {', '.join(healthy)}; collapsed: below a fifth of it."]
    return "\n".join(out)


def figure(results: list[dict], args: Args, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets = [t for t in ("ema", "no-ema") if t in args.targets]
    fig, axes = plt.subplots(len(args.dataset), len(targets), figsize=(6.5 * len(targets), 4.3 * len(args.dataset)),
                             squeeze=False, sharey="row")
    for i, dataset in enumerate(args.dataset):
        for ax, target in zip(axes[i], targets):
            for j, row in enumerate(args.rows):
                rs = [r for r in results
                      if (r["row"], r["target"], r["dataset"]) == (row, target, dataset) and r["knn_by_step"]]
                if not rs:
                    continue
                steps = np.array([s for s, _ in rs[0]["knn_by_step"]])
                curves = np.array([[k for _, k in r["knn_by_step"]] for r in rs if len(r["knn_by_step"]) == len(steps)])
                ax.plot(steps, curves.mean(0), "o-", ms=3, color=f"C{j}", label=ROWS[row][0])
                ax.fill_between(steps, curves.min(0), curves.max(0), color=f"C{j}", alpha=0.15)
            ax.set(xlabel="step", ylabel="k-NN top-1 (%)",
                   title=f"{dataset}, {'with' if target == 'ema' else 'without'} "
                         f"EMA target ({'train_byol.py' if target == 'ema' else 'train_simsiam.py'})")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: Args) -> list[dict]:
    if args.jobs < 1 or not args.seeds or not args.dataset or (args.epochs is not None and args.epochs < 1):
        raise SystemExit("error: --jobs and --epochs must be >= 1, and --seeds and --dataset must name at least one")
    import common
    import data
    import rundir
    scale, jobs, envs = scale_of(args), plan(args), slots(args.gpus, args.gpus_per_run, args.jobs)
    results_dir = Path(args.results_dir or f"results/{'+'.join(args.dataset)}-{scale}")
    if args.download and not args.dry_run:
        fetch_data(args.dataset, args.data_dir)
    if args.cluster.slurm:
        h200 = estimate(jobs, Args(**{**vars(args), "time_steps": 0}))[1] if scale == "paper" else None
        SL.submit(jobs, args.cluster, args.gpus_per_run, name="grid", dry_run=args.dry_run, estimate_h=h200)
        return []
    if args.dry_run:
        print(estimate(jobs, args)[0])
        return []
    todo = [j for j in jobs if not (j["dir"] / "linear_eval.json").exists()]
    machine = machine_line(args.gpus, args.gpus_per_run, args.jobs)
    print(f"grid: {len(jobs)} runs ({len(jobs) - len(todo)} done already) on {machine} -> {results_dir}", flush=True)
    t0 = time.perf_counter()
    if not args.collect:
        execute(todo, envs, args.gpus_per_run)
    finished = {j["dir"].name for j in jobs if (j["dir"] / "linear_eval.json").exists()}
    kept = earlier_records(results_dir / "grid.json", todo) if args.collect else {}
    results = [collect(j) if j["dir"].name in finished else kept[j["dir"].name] for j in jobs
               if j["dir"].name in finished | kept.keys()]
    missing = [j for j in jobs if j["dir"].name not in finished | kept.keys()]
    print("".join(f"  not finished (left out): {j['dir']}\n" for j in missing), end="")
    if not results:
        raise SystemExit("error: no run of the grid has finished yet")
    refs = {}
    for dataset in args.dataset:
        for seed in args.seeds:
            s = run_settings(next(j for j in jobs if (j["dataset"], j["seed"]) == (dataset, seed)))
            refs[(dataset, seed)] = evaluate_random_init(
                Path(args.runs_dir) / f"{dataset}-{scale}" / f"random-init-s{seed}",
                seed, s.width, s.crop or data.CROP_SIZE[dataset], dataset=dataset, data_dir=args.data_dir)
    command = (" ".join(["python grid.py", *map(shlex.quote, sys.argv[1:])]) if Path(sys.argv[0]).name == "grid.py"
               else f"grid.main({args})")
    when = time.strftime("%Y-%m-%d")
    header = (f"`{command}`: {len(args.seeds)} seed(s) per row, on {machine}, {when}"
              + (f" (epochs overridden: {args.epochs})" if args.epochs else "") + ".")
    results_dir.mkdir(parents=True, exist_ok=True)
    text = table(results, refs, args, header)
    common.atomic_write_text(results_dir / "grid.md", text + "\n")
    common.atomic_write_text(results_dir / "grid.json", json.dumps(dict(
        command=command, date=when, machine=machine, scale=scale, args=asdict(args),
        minutes=(time.perf_counter() - t0) / 60, provenance=rundir.provenance(), runs=results,
        random_init=[dict(dataset=d, seed=s, linear=100 * r["offline_linear"]["top1"],
                          knn=100 * r["knn"]["results"]["k=20"]["top1"])
                     for (d, s), r in refs.items()]), indent=1) + "\n")
    figure(results, args, results_dir / "knn.png", "k-NN monitor during training (10,000 train images as the bank, "
           f"so below linear_eval.py's k-NN in the table): {header.strip('.')}")
    print("\n" + text + f"\n\nwrote grid.md, grid.json, knn.png in {results_dir}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
