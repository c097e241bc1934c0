"""slurm.py: the job array it submits (to stub sbatch/srun/sacct executables: the exact sbatch script, what
each array index runs, the dry run), and through submitit's local executor, which runs the same pickled jobs
on this machine with SLURM's signal and requeue protocol: a run cut at its time limit, requeued, that ends
bit for bit as an uninterrupted one, and a job of two tasks (gloo) that trains one run with both ranks."""

import json
import os
import re
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
import torch
import tyro

import grid as G
from slurm import SlurmOptions, submit
from tiny_data import write_cifar10

REPO = Path(__file__).resolve().parent.parent
TINY = ("--width 0.0625 --proj-hidden 32 --pred-hidden 32 --proj-dim 16 --batch-size 8 --steps-per-epoch 3 "
        "--warmup-epochs 0 --eval-every 1 --knn-k 5")


def test_the_options_are_the_runners_own_dash_dash_slurm_options():
    @dataclass
    class Runner:  # how grid.py and paper_figures.py embed them
        epochs: int = 1
        cluster: Annotated[SlurmOptions, tyro.conf.OmitArgPrefixes] = SlurmOptions()

    args = tyro.cli(Runner, args=["--slurm", "--slurm-partition", "gpu", "--slurm-nodes", "2", "--epochs", "3"])
    assert args.cluster == SlurmOptions(slurm=True, slurm_partition="gpu", slurm_nodes=2) and args.epochs == 3
    assert tyro.cli(Runner, args=[]).cluster.slurm is False


def stubs(folder: Path) -> Path:
    """sbatch (keeps its script, answers a job id), sacct (every task pending), srun, scancel, squeue."""
    folder.mkdir()
    scripts = dict(sbatch=f'cp "$1" {folder}/submitted.sh\necho "Submitted batch job 4242"',
                   sacct='echo "JobID|State|NodeList"\necho "4242_[0-2%2]|PENDING|None assigned"',
                   srun="exit 1", scancel="exit 0", squeue="exit 0")
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> {folder}/calls\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def test_one_array_its_resources_and_each_runs_commands_and_the_dry_run_submits_nothing(tmp_path, monkeypatch, capsys):
    from submitit.core.utils import DelayedSubmission
    bin_ = stubs(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    jobs = G.plan(G.Args(dataset=("cifar10",), rows=("mlp", "isoloss"), runs_dir=str(tmp_path / "runs")))
    assert len(jobs) == 4
    jobs[1]["dir"].mkdir(parents=True)
    (jobs[1]["dir"] / "linear_eval.json").write_text("{}")  # finished: not submitted
    todo = [jobs[0], *jobs[2:]]
    opts = SlurmOptions(slurm=True, slurm_partition="gpu", slurm_account="lab", slurm_time=60, slurm_parallel=2,
                        slurm_nodes=2, slurm_log_dir=str(tmp_path / "slurm"), slurm_extra="constraint=a100 --qos=high")

    assert submit(jobs, opts, 8, name="grid", dry_run=True) == []
    dry = capsys.readouterr().out
    assert not (tmp_path / "slurm").exists() and not (bin_ / "calls").exists()  # nothing written, nothing run

    submitted = submit(jobs, opts, 8, name="grid", estimate_h=30.5)
    out = capsys.readouterr().out
    script = (bin_ / "submitted.sh").read_text()
    assert script in dry  # the dry run shows the very script that is submitted
    lines = script.splitlines()
    for flag in ("array=0-2%2", "nodes=2", "ntasks-per-node=4", "gpus-per-node=4", "cpus-per-task=10", "mem=64GB",
                 "time=60", "signal=USR2@120", "partition=gpu", "account=lab", "constraint=a100", "qos=high",
                 "job-name=grid", "requeue", f"chdir={REPO}"):
        assert f"#SBATCH --{flag}" in lines, flag
    assert any(line.startswith("srun --unbuffered") and "submitit.core._submit" in line for line in lines)
    assert [j.job_id for j in submitted] == ["4242_0", "4242_1", "4242_2"]
    assert (bin_ / "calls").read_text().count("sbatch ") == 1  # one submission: the array
    assert submitted[0].state == "PENDING"  # from the (stub) sacct, as submitit reads it
    manifest = (tmp_path / "slurm" / "jobs-4242.txt").read_text()
    for i, job in enumerate(todo):  # each array index runs its run's exact commands, in its directory
        run = DelayedSubmission.load(submitted[i].paths.submitted_pickle).function
        assert run.cmds == job["cmds"] and run.run_dir == str(job["dir"]) and run.repo == str(REPO)
        assert f"{i}\t{job['dir']}\n\tpython {shlex.join(job['cmds'][0])}\n\tpython {shlex.join(job['cmds'][1])}\n" \
            in manifest
        assert f"python {shlex.join(job['cmds'][0])}" in out and f"python {shlex.join(job['cmds'][1])}" in out
    assert "slurm: 3 run(s) to submit (1 done already)" in out and "at most 2 at a time" in out
    assert "GPU-hours: 30.5 estimated" in out and "at most 24.0 reserved" in out and "sacct -j 4242" in out
    with pytest.raises(SystemExit, match="does not split evenly"):
        submit(jobs, opts, 3, dry_run=True)


def test_the_grid_on_slurm_dry_run_is_the_array_of_its_12_runs_with_their_gpu_hours_and_script(tmp_path, capsys):
    G.main(G.Args(dataset=("cifar10",), runs_dir=str(tmp_path), dry_run=True,
                  cluster=SlurmOptions(slurm=True, slurm_partition="gpu", slurm_log_dir=str(tmp_path / "slurm"))))
    out = capsys.readouterr().out
    assert out.startswith("slurm: 12 run(s) to submit (0 done already)") and out.count("        python train_") == 12
    assert "1 node(s) x 1 task(s), 1 GPU(s)" in out and "#SBATCH --array=0-11%12" in out
    assert re.search(r"GPU-hours: 2\d\.\d estimated", out) and "#SBATCH --partition=gpu" in out
    assert not (tmp_path / "slurm").exists()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data") / "cifar")


def tiny_run(out: Path, data: Path, epochs: int) -> list[list[str]]:
    return [["train_simsiam.py", "simsiam", *shlex.split(TINY), "--dataset", "cifar10", "--data-dir", str(data),
             "--epochs", str(epochs), "--save-every", "1", "--num-workers", "0", "--out-dir", str(out)],
            ["linear_eval.py", "--checkpoint", str(out / "backbone.pt"), "--dataset", "cifar10",
             "--data-dir", str(data), "--num-workers", "0"]]


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
        except OSError:
            pass
    return out


@pytest.fixture
def local_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both runs alike (the comparison is bit for bit)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the job's Python unpickles slurm.RunJob


def test_a_run_cut_at_its_time_limit_is_requeued_and_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path, cifar,
                                                                                               local_env):
    jobs = [dict(dir=tmp_path / name, cmds=tiny_run(tmp_path / name, cifar, 3)) for name in ("cut", "whole")]
    # A limit of 10 min: submitit takes USR2 for the time limit (not a preemption) once 0.8 of it or all but 10 min
    # have passed, so from the start here (core/job_environment.py, has_timed_out); the test ends long before.
    opts = SlurmOptions(slurm_time=10, slurm_log_dir=str(tmp_path / "submitit"))
    cut, whole = submit(jobs, opts, 0, cluster="local")
    deadline = time.time() + 180
    while not (tmp_path / "cut" / "last.pt").exists():  # its first step is saved: the run is under way
        assert time.time() < deadline and cut.state == "RUNNING", cut.stderr()
        time.sleep(0.02)
    # The time limit's signal, to the task as SLURM sends it (--signal=USR2@S reaches the job's tasks); the local
    # controller would send it only at its own timeout, and LocalJob._interrupt signals the controller itself.
    (task,) = children(cut._process.pid)
    os.kill(task, signal.SIGUSR2)
    assert cut.result() == str(tmp_path / "cut") and whole.result() == str(tmp_path / "whole")
    log = (tmp_path / "cut" / "log.txt").read_text()
    submitit_log = cut.stderr() + cut.stdout()
    assert "USR2: the job is requeued" in log and "this job is timed-out" in submitit_log
    assert f"Requeued job {cut.job_id} (9 remaining timeouts)" in submitit_log  # slurm.MAX_REQUEUES - 1
    assert re.search(r"resuming \S+last.pt at step [1-8]\n", log), log  # mid-run: 9 steps in all
    assert "resuming" not in (tmp_path / "whole" / "log.txt").read_text()
    a, b = (torch.load(tmp_path / name / "backbone.pt") for name in ("cut", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all((tmp_path / name / "linear_eval.json").exists() for name in ("cut", "whole"))


def test_a_job_of_two_tasks_trains_one_run_with_both_ranks(tmp_path, cifar, local_env):
    run = tmp_path / "ddp"
    (job,) = submit([dict(dir=run, cmds=tiny_run(run, cifar, 1))], SlurmOptions(slurm_log_dir=str(tmp_path / "s")), 0,
                    cluster="local", tasks_per_node=2)
    assert job.results() == [str(run), str(run)]  # both tasks ended well
    log = (run / "log.txt").read_text()
    assert " 2 x cpu" in log and log.count("python linear_eval.py") == 1, log  # world size 2; evaluated once
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 3 and json.loads((run / "linear_eval.json").read_text())["knn"]
