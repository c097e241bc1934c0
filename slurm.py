"""Runs on a SLURM cluster: one job array, one array task per run, requeued at its time limit and resumed
from its last.pt; the same runner command without --slurm then collects the results.

    python grid.py --dataset cifar10 --slurm --slurm-partition gpu            # Table 1: 12 array tasks, 1 GPU each
    python grid.py --dataset cifar10 --slurm --slurm-partition gpu --dry-run  # the runs and the sbatch script only
    python grid.py --dataset cifar10 --gpus-per-run 8 --slurm --slurm-nodes 2 # each run on 2 nodes x 4 GPUs (DDP)
    python grid.py --dataset cifar10                                          # once they are done: the table

The runners (grid.py, paper_figures.py) embed SlurmOptions, so the --slurm-* options below are theirs. Nothing
else in the repository needs submitit: it is imported here only when jobs are submitted or run.

A run in a job: RunJob runs its two commands, the training script then linear_eval.py, in the repository root,
appending their output to RUN_DIR/log.txt as the local pool does. SLURM starts one task per GPU (srun, from
submitit's sbatch script); each task runs the training script itself with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set (rundir.setup_distributed: NCCL, cuda:LOCAL_RANK; no torchrun inside a job);
linear_eval.py runs once, on rank 0, after the training. --slurm-signal-s seconds before the time limit SLURM
sends USR2: submitit pickles the job again and requeues it (scontrol requeue), and the training command, started
again with the same --out-dir, resumes from last.pt (written atomically at every epoch end and every --save-every
steps), so a run longer than the time limit takes several jobs. A run with its linear_eval.json is not submitted.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent
# Requeues after a time limit before submitit gives a run up: a run needs at most this many + 1 time limits.
MAX_REQUEUES = 10


@dataclass(frozen=True)  # frozen: hashable, so a runner's Args can have SlurmOptions() itself as a default
class SlurmOptions:
    slurm: bool = False
    """submit the runs to SLURM as one job array (see slurm.py) instead of running them here"""
    slurm_partition: str = ""
    """partition (empty: the cluster's default)"""
    slurm_account: str = ""
    """account to charge (empty: your default)"""
    slurm_time: int = 1440
    """time limit of a job in minutes; a run that needs longer is requeued and resumes from its last.pt"""
    slurm_cpus_per_task: int = 10
    """CPUs of each task, that is of each GPU (one task per GPU): the data loader's workers and one more"""
    slurm_mem_gb: int = 64
    """memory per node in GB (0: the cluster's default)"""
    slurm_parallel: int = 0
    """most runs (array tasks) at a time (0: no limit)"""
    slurm_nodes: int = 1
    """nodes per run (multi-node DDP): --gpus-per-run is split evenly over them"""
    slurm_log_dir: str = "runs/slurm"
    """submitit's folder (pickles, sbatch script, logs, jobs-ARRAYID.txt); on a file system the nodes share"""
    slurm_signal_s: int = 120
    """USR2 this many seconds before the time limit: the job is requeued"""
    slurm_extra: str = ""
    """more sbatch options, e.g. "constraint=a100 qos=high" or "--gres=gpu:a100:4 --exclusive" """


# --- A run in a job -----------------------------------------------------------------------------


def _child_setup() -> None:
    """In the child, before exec: USR2 is the job's to handle (submitit requeues, then this task ends the child);
    ignored here, the training cannot die of it before the task has requeued, nor run on past the task's end
    (PR_SET_PDEATHSIG: SIGTERM when the task dies, even of SIGKILL)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, Linux
    except OSError:
        pass


def distributed_env() -> dict[str, str]:
    """The variables rundir.setup_distributed reads, for this task of a job with several tasks."""
    from submitit.helpers import TorchDistributedEnvironment
    d = TorchDistributedEnvironment()  # rank and world from SLURM_PROCID / SLURM_NTASKS, port from the job id
    # Not d.export(): it sets CUDA_VISIBLE_DEVICES to the local rank, which is another job's GPU when SLURM gave
    # this one, say, GPUs 4-7. SLURM shows each task all the node's GPUs of the job: rank LOCAL_RANK takes
    # cuda:LOCAL_RANK among them, as under torchrun. Where the cluster binds one GPU per task, that is cuda:0.
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    index = 0 if len(visible) == 1 else d.local_rank
    if len(visible) > 1 and index >= len(visible):
        raise RuntimeError(f"task {d.rank}: local rank {d.local_rank} but CUDA_VISIBLE_DEVICES={','.join(visible)}")
    # No LOCAL_WORLD_SIZE (torchrun's): SLURM binds each task to its own --cpus-per-task, which the training's
    # loader sizes itself by (common.loader_workers), where torchrun's ranks share one set of cores.
    return dict(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(index), MASTER_ADDR=d.master_addr,
                MASTER_PORT=str(d.master_port))


class RunJob:
    """One run: its commands (argv lists without the interpreter: the training script's, then linear_eval.py's)
    in `repo`, output appended to RUN_DIR/log.txt. Picklable; submitit calls it in every task of the job.

    Requeue: submitit calls `checkpoint` (looked up by name, so this class need not import submitit to subclass
    its Checkpointable) on rank 0 when USR2 comes, pickles what it returns (this same job) and requeues the job.
    The training child ignores USR2; the requeue ends this task (SystemExit out of the wait below, or SLURM's
    SIGTERM/SIGKILL of every process of the job), and the `finally` below, PR_SET_PDEATHSIG and SLURM all end
    the child with it. Relied on: SLURM starts a requeued job only after every process of the old one is gone,
    so no two trainings write one run directory; a child killed mid-save leaves last.pt whole (atomic writes)."""

    def __init__(self, run_dir: str | Path, cmds: list[list[str]], repo: str | Path = REPO):
        self.repo, self.cmds = str(repo), [[str(a) for a in cmd] for cmd in cmds]
        self.run_dir = str(Path(repo) / run_dir)  # the commands' relative paths are relative to the repository

    def __call__(self) -> str:
        import submitit
        out = Path(self.run_dir)
        if (out / "linear_eval.json").exists():
            return self.run_dir
        env = submitit.JobEnvironment()
        out.mkdir(parents=True, exist_ok=True)
        # Only a job of several tasks is distributed: one task runs the script plainly, as the local pool does.
        dist = distributed_env() if env.num_tasks > 1 else {}
        for cmd in self.cmds:
            training = Path(cmd[0]).name.startswith("train_")
            if not training and env.global_rank != 0:
                break  # linear_eval.py: rank 0 only, once the training has ended in every task
            self._run(cmd, dist if training else {}, env)
        return self.run_dir

    def _run(self, cmd: list[str], extra_env: dict, env) -> None:
        log_path = Path(self.run_dir) / "log.txt"
        with open(log_path, "a") as log:
            if env.global_rank == 0:
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {env.cluster} job {env.job_id} on "
                          f"{socket.gethostname()}, {env.num_tasks} task(s): python {shlex.join(cmd)}\n")
                log.flush()
            proc = subprocess.Popen([sys.executable, *cmd], cwd=self.repo, env={**os.environ, **extra_env},
                                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup)
            try:
                code = proc.wait()
            finally:  # anything raised while waiting (the requeue's SystemExit, KeyboardInterrupt): end the child
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        if code != 0:  # killed by a signal (SLURM's SIGTERM on a cancel or a preemption without USR2): code < 0
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"python {shlex.join(cmd)} {how} (log: {log_path}):\n" + "\n".join(tail))

    def checkpoint(self):
        """Called by submitit on USR2 (time limit or preemption): this same job again. The state that matters is the
        run's last.pt, which the training command resumes from."""
        from submitit.helpers import DelayedSubmission
        with open(Path(self.run_dir) / "log.txt", "a") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} USR2: the job is requeued; the run resumes from "
                      "last.pt\n")
        return DelayedSubmission(self)


# --- Submitting ---------------------------------------------------------------------------------


def sbatch_extras(text: str) -> dict:
    """ "constraint=a100 --qos=high exclusive" -> {"constraint": "a100", "qos": "high", "exclusive": True};
    underscores in the keys, so that an extra replaces submitit's own option of that name (gpus_per_node, ...)."""
    out = {}
    for item in shlex.split(text):
        key, eq, value = item.lstrip("-").partition("=")
        out[key.replace("-", "_")] = value if eq else True
    return out


def sbatch_parameters(opts: SlurmOptions, gpus_per_run: int, name: str, tasks_per_node: int = 0) -> dict:
    """submitit.SlurmExecutor's parameters (its sbatch names) for a job of one run: opts.slurm_nodes nodes with
    gpus_per_run / nodes GPUs and as many tasks each (tasks_per_node overrides: several CPU tasks, gloo)."""
    nodes = opts.slurm_nodes
    if nodes < 1 or gpus_per_run < 0 or gpus_per_run % nodes:
        raise SystemExit(f"error: --gpus-per-run {gpus_per_run} does not split evenly over --slurm-nodes {nodes}")
    gpus = gpus_per_run // nodes
    extras = sbatch_extras(opts.slurm_extra)
    params = dict(job_name=name, time=opts.slurm_time, nodes=nodes, ntasks_per_node=tasks_per_node or max(1, gpus),
                  gpus_per_node=gpus or None, cpus_per_task=opts.slurm_cpus_per_task,
                  mem=f"{opts.slurm_mem_gb}GB" if opts.slurm_mem_gb else None, signal_delay_s=opts.slurm_signal_s,
                  partition=opts.slurm_partition or None, account=opts.slurm_account or None,
                  # --requeue: scontrol requeue refuses a job that is not requeueable (JobRequeue=0 clusters);
                  # --chdir: the job's Python must find slurm.py (python -m puts the working directory on sys.path).
                  additional_parameters={"requeue": True, "chdir": str(REPO), **extras})
    return {k: v for k, v in params.items() if v is not None}


def _executor(cluster: str, folder: Path, params: dict):
    import submitit
    if cluster == "local":  # submitit's stand-in on this machine (the tests): one node, the same tasks and signal
        if params["nodes"] > 1:
            raise SystemExit("error: submitit's local executor has one node")
        ex = submitit.LocalExecutor(folder, max_num_timeout=MAX_REQUEUES)
        ex.update_parameters(timeout_min=params["time"], tasks_per_node=params["ntasks_per_node"],
                             gpus_per_node=params.get("gpus_per_node", 0), signal_delay_s=params["signal_delay_s"])
        return ex
    ex = submitit.SlurmExecutor(folder, max_num_timeout=MAX_REQUEUES)  # needs srun on PATH
    ex.update_parameters(**params)
    return ex


def sbatch_script(folder: Path, params: dict, n: int) -> str:
    """The script SlurmExecutor submits for an array of n such jobs: submitit's own text, its own command."""
    from submitit.slurm.slurm import _make_sbatch_string
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=n if n > 1 else None, **params)


def submit(jobs: list[dict], opts: SlurmOptions, gpus_per_run: int, *, name: str = "isoloss",
           dry_run: bool = False, estimate_h: float | None = None, cluster: str = "slurm", tasks_per_node: int = 0,
           repo: Path = REPO) -> list:
    """Submit the runs of `jobs` (a runner's plan: "dir" and "cmds") that have no linear_eval.json, as one job
    array; print what and how, and write LOG_DIR/jobs-ARRAYID.txt. Returns submitit's jobs (none on a dry run,
    which prints the sbatch script instead and writes nothing). estimate_h: the runner's estimate of the
    GPU-hours; cluster "local": submitit's LocalExecutor on this machine instead of SLURM (the tests)."""
    todo = [j for j in jobs if not (Path(repo) / j["dir"] / "linear_eval.json").exists()]
    params = sbatch_parameters(opts, gpus_per_run, name, tasks_per_node)
    params["array_parallelism"] = opts.slurm_parallel or max(1, len(todo))  # submitit's default would be 256
    folder = (Path(repo) / opts.slurm_log_dir / "%j").absolute()
    text = summary(todo, len(jobs), opts, gpus_per_run, params, estimate_h)
    if not todo:
        print(text + "\nnothing to submit", flush=True)
        return []
    if dry_run:
        script = sbatch_script(folder, params, len(todo))
        print(f"{text}\n\nsbatch script (dry run: nothing submitted):\n\n{script}", flush=True)
        return []
    submitted = _executor(cluster, folder, params).submit_array([RunJob(j["dir"], j["cmds"], repo) for j in todo])
    array_id = submitted[0].job_id.split("_")[0]
    manifest = folder.parent / f"jobs-{array_id}.txt"
    manifest.write_text(f"# {cluster} job {array_id}, submitted {time.strftime('%Y-%m-%d %H:%M')}: array index, "
                        "run directory, its commands (run in the repository root)\n" + "".join(
                            f"{i}\t{Path(repo) / j['dir']}\n" + "".join(f"\tpython {shlex.join(c)}\n"
                                                                        for c in j["cmds"])
                            for i, j in enumerate(todo)))
    print(f"{text}\n\nsubmitted: {cluster} job {array_id} ({len(submitted)} array task(s)); index -> run: "
          f"{manifest}\nfollow:    squeue --me; sacct -j {array_id}; tail -f {submitted[0].paths.stdout} "
          "(index 0, task 0), or RUN_DIR/log.txt\n"
          "when done (squeue --me lists none of them): the same command without --slurm collects the results; it\n"
          "           runs what is unfinished here, so not while a job of the array may still run",
          flush=True)
    return submitted


def summary(todo: list[dict], n_all: int, opts: SlurmOptions, gpus_per_run: int, params: dict,
            estimate_h: float | None) -> str:
    n, tasks = len(todo), params["nodes"] * params["ntasks_per_node"]
    where = ", ".join(f"{k} {params[k]}" for k in ("partition", "account") if k in params)
    lines = [f"slurm: {n} run(s) to submit ({n_all - n} done already) as one job array, at most "
             f"{params['array_parallelism']} at a time" + (f"; {where}" if where else ""),
             f"  each: {params['nodes']} node(s) x {params['ntasks_per_node']} task(s), "
             f"{params.get('gpus_per_node', 0)} GPU(s) and {params.get('mem', 'the default memory')} per node, "
             f"{params['cpus_per_task']} CPUs per task, time limit {params['time']} min, "
             f"USR2 {params['signal_delay_s']} s before it (requeued, at most {MAX_REQUEUES} times)"
             + (f"; sbatch extras {opts.slurm_extra}" if opts.slurm_extra else "")]
    for i, job in enumerate(todo):
        ranks = f"  ({tasks} tasks: training with RANK 0-{tasks - 1}, then linear_eval.py on rank 0)"
        lines += [f"  [{i}] {job['dir']}" + (ranks if tasks > 1 else "")]
        lines += [f"        python {shlex.join(map(str, cmd))}" for cmd in job["cmds"]]
    hours = params["time"] / 60 * gpus_per_run * n
    lines.append((f"GPU-hours: {estimate_h:.1f} estimated (the runner's H200 estimate of the training steps); "
                  if estimate_h is not None else "GPU-hours: ")
                 + (f"at most {hours:.1f} reserved per round of the array ({params['time']} min x {gpus_per_run} "
                    f"GPU(s) x {n} run(s)); a run longer than the limit is requeued" if gpus_per_run
                    else "none (CPU tasks)"))
    return "\n".join(lines)
