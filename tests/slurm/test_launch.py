"""The submit path without a cluster: submitit's debug (in-process) and local (subprocess) executors."""
import json
import logging
import os
import signal
import subprocess
import time

import pytest
import torch
from submitit.core.utils import JobPaths

from bam.checkpoint import load_file
from eval.run import main as eval_main
from pretrain.main import main as pretrain_main
from slurm.launch import (
    FrontDoorJob,
    failure_message,
    parse_sweep,
    strip_launch_flags,
    submit,
    sweep_elements,
    wait_for,
)
from slurm.outcome import read_outcome
from slurm.profiles import load_profile
from slurm.status import collect

from ..conftest import assert_one_line_error, tiny_args


def test_the_job_runs_the_command_line_without_the_launch_flags():
    argv = ["--task", "knn", "--launcher", "slurm", "--profile=gpu-1", "--wait", "--k", "5", "--sbatch",
            "exclusive=true", "--nodes", "2", "--output-dir", "o"]
    assert strip_launch_flags(argv) == ["--task", "knn", "--k", "5", "--output-dir", "o"]
    sweep = parse_sweep(["fractions=0.01,0.1", "split_file=1percent.txt,10percent.txt"])
    assert sweep_elements(sweep) == [("fractions=0.01", ["--fractions", "0.01", "--split-file", "1percent.txt"]),
                                     ("fractions=0.1", ["--fractions", "0.1", "--split-file", "10percent.txt"])]
    with pytest.raises(ValueError, match="expected FLAG=V1,V2"):
        parse_sweep(["fractions"])
    with pytest.raises(ValueError, match="different numbers of values"):
        parse_sweep(["fractions=0.01,0.1", "split-file=a"])


def test_profiles_are_read_from_yaml_and_overridden_by_flags(tmp_path):
    p = load_profile("gpu-2x8")
    assert (p.nodes, p.gpus_per_node, p.tasks_per_node, p.world_size) == (2, 8, 8, 16)
    q = load_profile("gpu-2x8", nodes=4, partition="big", sbatch={"exclusive": True}, time_min=None)
    assert (q.nodes, q.partition, q.time_min, q.sbatch, q.world_size) == (4, "big", p.time_min, {"exclusive": True},
                                                                         32)
    mine = tmp_path / "mine.yaml"
    mine.write_text("lab:\n  partition: a100\n  gpus_per_node: 4\n  tasks_per_node: 4\n")
    assert load_profile("lab", mine).partition == "a100"
    mine.write_text("lab:\n  partiton: a100\n")
    with pytest.raises(ValueError, match="unknown fields \\['partiton'\\]"):
        load_profile("lab", mine)


def test_an_unknown_profile_or_no_sbatch_is_one_line(knn_argv, tmp_path, caplog, monkeypatch):
    argv = [*knn_argv, "--output-dir", str(tmp_path), "--launcher", "local", "--profile", "gpu-9000"]
    assert_one_line_error(eval_main, argv, caplog, "unknown --profile 'gpu-9000'; known: gpu-1, gpu-1x8")
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without SLURM's commands
    assert_one_line_error(eval_main, [*knn_argv, "--output-dir", str(tmp_path), "--launcher", "slurm"], caplog,
                          "--launcher slurm needs sbatch on PATH")


def test_an_eval_task_through_the_debug_executor_gives_the_in_process_numbers(knn_argv, tmp_path):
    assert eval_main([*knn_argv, "--output-dir", str(tmp_path / "direct")]) == 0
    assert eval_main([*knn_argv, "--output-dir", str(tmp_path / "job"), "--launcher", "debug"]) == 0
    direct, job = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("direct", "job"))
    assert job["metrics"] == direct["metrics"]
    record = json.loads((tmp_path / "job" / "job.json").read_text())
    assert record["launcher"] == "debug" and "--launcher" not in record["jobs"][0]["argv"]


def test_a_failing_job_reports_its_error_to_the_caller(knn_argv, tmp_path, caplog):
    # an input the job finds wrong only when it runs (flags are checked before submitting)
    argv = [*knn_argv, "--data", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"),
            "--launcher", "local"]
    caplog.clear()
    assert eval_main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "nowhere is not a folder" in errors[0], errors
    assert [r["state"] for r in collect(tmp_path / "out")] == ["FAILED"]


def test_a_sweep_is_one_job_per_value(knn_argv, tmp_path):
    assert eval_main([*knn_argv, "--output-dir", str(tmp_path), "--launcher", "local", "--sweep", "k=3,7"]) == 0
    for k in (3, 7):
        metrics = json.loads((tmp_path / f"k={k}" / "results.json").read_text())["metrics"]
        assert set(metrics) == {f"top1_k{k}", f"top5_k{k}"}
    rows = collect(tmp_path)
    assert [(r["name"], r["state"]) for r in rows] == [("k=3", "COMPLETED"), ("k=7", "COMPLETED")]


def test_two_tasks_train_with_ddp_and_end_with_the_weights_of_one_process(tiny_folder, tmp_path,
                                                                          uninterrupted_pretrain):
    out = tmp_path / "ddp"
    argv = [*tiny_args(tiny_folder, out, batch_size_per_gpu=4, epochs=6), "--launcher", "local",
            "--tasks-per-node", "2"]
    assert pretrain_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["ranks_agree"]
    ddp, single = load_file(out / "checkpoint.pth")["model"], load_file(uninterrupted_pretrain / "checkpoint.pth")
    for k, v in single["model"].items():
        assert torch.allclose(ddp[k], v, atol=1e-4), k


def _task_pid(folder, timeout=60):
    """The pid of the process submitit's local controller started for the job in ``folder``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-f", f"submitit.core._submit {folder}"], capture_output=True, text=True)
        if found.stdout.split():
            return int(found.stdout.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no job process for {folder}")


def test_a_preempted_job_requeues_and_ends_with_the_weights_of_an_uninterrupted_run(tiny_folder, tmp_path,
                                                                                    uninterrupted_pretrain):
    out = tmp_path / "preempted"
    jobs = submit("pretrain", tiny_args(tiny_folder, out, epochs=6), out, "local", load_profile("local"))
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").is_file() and time.time() < deadline:
        time.sleep(0.02)
    first = load_file(out / "checkpoint.pth")["epoch"]
    os.kill(_task_pid(out / "jobs"), signal.SIGUSR2)  # what SLURM sends before preempting or at the time limit
    assert wait_for(jobs) == [None]
    log = (out / "jobs" / f"{jobs[0].job_id}_0_log.err").read_text()
    assert first < 6 and "this job is preempted" in log and f"resuming from {out / 'checkpoint.pth'}" in log
    a, b = load_file(uninterrupted_pretrain / "checkpoint.pth"), load_file(out / "checkpoint.pth")
    assert b["epoch"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_the_job_resumes_from_the_file_training_writes(tmp_path, caplog):
    job = FrontDoorJob("pretrain", ["--epochs", "2", "--output-dir", str(tmp_path)], tmp_path)
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        again = job.checkpoint()
        # SLURM's requeue SIGTERMs the whole job: the scontrol requeue that submitit starts next must survive it
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        child = subprocess.Popen(["sleep", "30"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    try:
        child.terminate()
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()
    assert again.function == job and again.function is not job
    assert f"resume from {tmp_path / 'checkpoint.pth'}" in caplog.text


def test_a_requeue_names_the_checkpoint_a_subset_or_mmengine_wrote(tmp_path, caplog):
    """semisup fine-tuning writes <out>/<p>pct/checkpoint.pth, ADE20K <out>/mmseg/iter_N.pth: the requeue says the
    job resumes from them, not that it starts over."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        job = FrontDoorJob("eval", ["--task", "semisup", "--output-dir", str(tmp_path)], tmp_path)
        job.checkpoint()
        assert "no checkpoint yet, the job will start over" in caplog.text
        (tmp_path / "10pct").mkdir()
        (tmp_path / "10pct" / "checkpoint.pth").write_bytes(b"")
        job.checkpoint()
        assert f"resume from {tmp_path / '10pct' / 'checkpoint.pth'}" in caplog.text
        (tmp_path / "mmseg").mkdir()
        (tmp_path / "mmseg" / "iter_8.pth").write_bytes(b"")
        job.checkpoint()
        assert f"resume from {tmp_path / 'mmseg' / 'iter_8.pth'}" in caplog.text
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_failure_message_is_the_jobs_last_error():
    tb = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
          "last):\n  File \"x.py\", line 1\nslurm.launch.JobFailed: --k 'ten' must be comma-separated integers\n"
          "----------------------\nYou can check full logs with 'job.stderr(0)'")
    assert failure_message(RuntimeError(tb)) == "--k 'ten' must be comma-separated integers"
    tb = tb.replace("slurm.launch.JobFailed: --k 'ten' must be comma-separated integers", "MemoryError: out of memory")
    assert failure_message(RuntimeError(tb)) == "MemoryError: out of memory"


def test_launch_flags_without_a_launcher_and_status_of_nothing_are_one_line(knn_argv, tmp_path, caplog):
    argv = [*knn_argv, "--output-dir", str(tmp_path)]
    assert_one_line_error(eval_main, [*argv, "--sweep", "k=1,2"], caplog, "--sweep makes a job array: add --launcher")
    assert_one_line_error(pretrain_main, [*tiny_args(tmp_path, tmp_path / "p"), "--wait"], caplog,
                          "--wait waits for a submitted job")
    assert_one_line_error(eval_main, ["--status", str(tmp_path / "nowhere")], caplog, "is not a folder")
    assert_one_line_error(eval_main, ["--status", str(tmp_path)], caplog, "no job.json below it")


class _WritesAMarker:
    """What a crafted result file could hold: unpickling it would run os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_status_never_runs_code_from_a_result_file(knn_argv, tmp_path):
    import pickle

    assert eval_main([*knn_argv, "--output-dir", str(tmp_path / "run"), "--launcher", "local"]) == 0
    [row] = collect(tmp_path / "run")
    assert row["state"] == "COMPLETED"  # a plain-data result is read
    record = json.loads((tmp_path / "run" / "job.json").read_text())
    result = JobPaths(record["folder"], row["job_id"], task_id=0).result_pickle
    marker = tmp_path / "pwned"
    result.write_bytes(pickle.dumps(("success", _WritesAMarker(marker))))
    assert [r["state"] for r in collect(tmp_path / "run")] == ["FINISHED"]
    assert eval_main(["--status", str(tmp_path / "run")]) == 0
    assert not marker.exists()
    assert read_outcome(result) is None
