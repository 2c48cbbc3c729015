"""Real SLURM jobs through submitit (``slurm/local_cluster.sh up``; CI starts the cluster and always runs these)."""
import json
import logging
import subprocess
import time

import pytest
import torch

from bam.checkpoint import load_file
from eval.run import main as eval_main
from pretrain.main import main as pretrain_main
from slurm.launch import submit, wait_for
from slurm.profiles import load_profile
from slurm.status import collect

from ..conftest import assert_one_line_error, tiny_args
from ..eval.test_suite import small_suite
from ..eval.trainable import TRAINABLE, trainable
from .conftest import PREEMPTED_EPOCHS

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _sacct(job_id: str, field: str, *flags: str, lines: int = 1) -> str:
    """SLURM's accounting record of a job (slurmctld sends it to slurmdbd a moment after the job changes)."""
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", *flags, "-j", job_id, "-o", field], capture_output=True,
                             text=True).stdout.strip()
        if len(out.split()) >= lines or time.time() > deadline:
            return out
        time.sleep(1)


def test_an_eval_task_runs_as_a_slurm_job(knn_argv, tmp_path):
    assert eval_main([*knn_argv, "--output-dir", str(tmp_path / "direct")]) == 0
    assert eval_main([*knn_argv, "--output-dir", str(tmp_path / "job"), "--launcher", "slurm", "--wait"]) == 0
    direct, job = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("direct", "job"))
    assert job["metrics"] == direct["metrics"]
    (row,) = collect(tmp_path / "job")
    assert row["state"] == "COMPLETED" and _sacct(row["job_id"], "Partition") == "debug"
    assert "#SBATCH --partition=debug" in next((tmp_path / "job" / "jobs").glob("*_submission.sh")).read_text()


def test_a_sweep_is_a_slurm_job_array(knn_argv, tmp_path):
    argv = [*knn_argv, "--output-dir", str(tmp_path), "--launcher", "slurm", "--wait", "--sweep", "k=1,5,10"]
    assert eval_main(argv) == 0
    rows = collect(tmp_path)
    assert [r["name"] for r in rows] == ["k=1", "k=5", "k=10"] and {r["state"] for r in rows} == {"COMPLETED"}
    array_ids = {r["job_id"].split("_")[0] for r in rows}
    assert len(array_ids) == 1 and [r["job_id"].split("_")[1] for r in rows] == ["0", "1", "2"]
    for k in (1, 5, 10):
        assert f"top1_k{k}" in json.loads((tmp_path / f"k={k}" / "results.json").read_text())["metrics"]


def test_a_two_task_ddp_job_on_gloo_whose_ranks_agree(tiny_folder, tmp_path, uninterrupted_pretrain):
    out = tmp_path / "ddp"
    jobs = submit("pretrain", tiny_args(tiny_folder, out, batch_size_per_gpu=4, epochs=6), out, "slurm",
                  load_profile("local", tasks_per_node=2))
    assert wait_for(jobs) == [None]
    ranks = jobs[0].results()
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world_size"] for r in ranks} == {2}
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["ranks_agree"]
    ddp, single = load_file(out / "checkpoint.pth")["model"], load_file(uninterrupted_pretrain / "checkpoint.pth")
    for k, v in single["model"].items():
        assert torch.allclose(ddp[k], v, atol=1e-4), k


def test_a_preempted_job_is_requeued_and_finishes_from_its_checkpoint(tiny_folder, tmp_path,
                                                                      uninterrupted_long_pretrain):
    out = tmp_path / "preempted"
    # timeout_min >= 10: below, submitit counts every signal as a time-out rather than a preemption
    jobs = submit("pretrain", tiny_args(tiny_folder, out, epochs=PREEMPTED_EPOCHS), out, "slurm",
                  load_profile("local", time_min=30))
    deadline = time.time() + 180
    while not (out / "checkpoint.pth").is_file() and time.time() < deadline:
        time.sleep(0.05)
    first = load_file(out / "checkpoint.pth")["epoch"]
    jobs[0]._interrupt()  # what SLURM does to a preempted job: SIGTERM, then the USR2 submitit listens for
    assert wait_for(jobs) == [None]
    log = jobs[0].stderr() or ""
    assert first < PREEMPTED_EPOCHS and "this job is preempted" in log
    assert f"resuming from {out / 'checkpoint.pth'}" in log
    states = _sacct(jobs[0].job_id, "State", "--duplicates", lines=2).split()  # two runs, the first requeued
    assert len(states) == 2 and states[0] == "REQUEUED", states
    a, b = load_file(uninterrupted_long_pretrain / "checkpoint.pth"), load_file(out / "checkpoint.pth")
    assert b["epoch"] == PREEMPTED_EPOCHS
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.parametrize("task", TRAINABLE)
def test_a_preempted_evaluation_is_requeued_mid_epoch_and_ends_with_the_uninterrupted_weights(
        task, tmp_path, tiny_checkpoint, one_thread):
    """``eval/run.py --task <task>`` as a SLURM job, preempted once its first checkpoint is written (fine-tuning and
    probes: early in epoch 2 of 3; COCO: about iteration 3 of 8, 6 an epoch): the job saves after the step under
    way, submitit requeues it, the requeued run resumes there and ends with the weights, metrics and log of the same
    command run uninterrupted in this process."""
    run = trainable(task, tmp_path, tiny_checkpoint)
    out = tmp_path / "preempted"
    jobs = submit("eval", run.argv, out, "slurm", load_profile("local", time_min=30))  # >= 10: a preemption
    deadline = time.time() + 180
    while not (out / run.checkpoint).is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert (out / run.checkpoint).is_file(), jobs[0].stderr()
    jobs[0]._interrupt()  # SIGTERM, then USR2
    # meanwhile (SLURM starts a requeued job no sooner than cred_expire + 1 s): the same command, never interrupted
    assert eval_main(run.command(tmp_path / "whole")) == 0
    assert wait_for(jobs) == [None]
    log = jobs[0].stderr() or ""
    # the USR2 that requeues, sent last, still found the loop training: it saved after the step, then passed it on
    assert "SIGUSR2: state saved; passing the signal on" in log and "this job is preempted" in log
    (resumed,) = run.resumed_at(log)
    assert 0 < resumed < run.total_steps and resumed % run.steps_per_epoch, resumed  # mid-epoch
    states = _sacct(jobs[0].job_id, "State", "--duplicates", lines=2).split()
    assert len(states) == 2 and states[0] == "REQUEUED", states
    run.assert_same_outcome(tmp_path / "whole", out)


def test_a_failing_job_reports_its_error_to_the_caller(knn_argv, tmp_path, caplog):
    # an input the job finds wrong only when it runs (flags are checked before submitting)
    argv = [*knn_argv, "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"),
            "--launcher", "slurm", "--wait"]
    caplog.clear()
    assert eval_main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "nowhere is not a folder" in errors[0], errors
    assert [r["state"] for r in collect(tmp_path / "out")] == ["FAILED"]


def test_a_partition_that_does_not_exist_is_sbatchs_error_in_one_line(knn_argv, tmp_path, caplog):
    argv = [*knn_argv, "--output-dir", str(tmp_path), "--launcher", "slurm", "--partition", "nowhere"]
    assert_one_line_error(eval_main, argv, caplog, "invalid partition")
    assert_one_line_error(pretrain_main, [*tiny_args(tmp_path, tmp_path / "p"), "--launcher", "slurm",
                                          "--partition", "nowhere"], caplog, "invalid partition")


def test_a_suite_runs_evaluations_after_their_pretraining_and_renders_the_table(tmp_path, tiny_folder, capsys):
    out = tmp_path / "out"
    assert eval_main(["--suite", str(small_suite(tmp_path, tiny_folder)), "--output-dir", str(out),
                      "--launcher", "slurm"]) == 0
    jobs = {r["name"]: r["job_id"] for r in collect(out)}
    assert set(jobs) == {"pre", "knn", "(suite table / report)"}
    held = subprocess.run(["squeue", "-h", "-j", jobs["knn"], "-o", "%E"], capture_output=True, text=True).stdout
    assert f"afterok:{jobs['pre']}" in held  # SLURM holds the evaluation until its pretraining succeeds
    deadline = time.time() + 300
    while time.time() < deadline and {r["state"] for r in collect(out)} != {"COMPLETED"}:
        time.sleep(2)
    assert {r["state"] for r in collect(out)} == {"COMPLETED"}
    knn = json.loads((out / "knn" / "results.json").read_text())
    assert f"| tiny k-NN (k=5) | {knn['metrics']['top1_k5']:.1f} |" in (out / "paper_table.md").read_text()
    assert eval_main(["--status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "(suite table / report)" in status and f"{jobs['knn']}  COMPLETED" in status
