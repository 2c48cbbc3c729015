"""The paper suite in miniature on a real SLURM (``--suite paper-mini``): every step a 2-task job, one preempted.

About 42 minutes on 2 CPU cores, so not part of the default run: ``BAM_PAPER_MINI=1 pytest -m paper_mini`` with
``slurm/local_cluster.sh up`` (the README gives the last measured time).
"""
import json
import os
import re
import time
from pathlib import Path

import pytest
import submitit

from eval.paper_table import table_rows
from eval.run import main as eval_main
from eval.suite import load_suite
from slurm.status import collect

from .test_real_cluster import _sacct

DEADLINE_S = 3 * 3600
pytestmark = [pytest.mark.slurm, pytest.mark.paper_mini, pytest.mark.usefixtures("slurm_cluster"),
              pytest.mark.timeout(DEADLINE_S + 600),
              pytest.mark.skipif(os.environ.get("BAM_PAPER_MINI") != "1",
                                 reason="about 42 minutes: set BAM_PAPER_MINI=1 to run the paper suite in miniature")]
PREEMPTED = "pretrain_vit_small"  # the first job; every evaluation of ViT-S/16 waits for it (afterok)
ENDED = ("COMPLETED", "FAILED", "FINISHED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL")


def _wait(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s")


def _stderr(step_dir: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((step_dir / "jobs").glob(f"{job_id}_*_log.err")))


def test_the_paper_suite_runs_in_miniature_with_two_tasks_per_job_and_a_preemption(tmp_path):
    out = tmp_path / "paper-mini"
    started = time.time()
    assert eval_main(["--suite", "paper-mini", "--launcher", "slurm", "--output-dir", str(out)]) == 0
    spec = load_suite("paper-mini")
    rows = collect(out)
    jobs = {r["name"]: r for r in rows}
    array = [f"semisup_vit_base/fractions={f}" for f in ("0.01", "0.1")]  # a row per element
    assert set(jobs) == {*spec["steps"], *array, "(suite table / report)"} - {"semisup_vit_base"}
    for r in rows:
        assert f"tasks/node={1 if r['name'] == '(suite table / report)' else 2} " in r["resources"], r

    # preempt the first pretraining in the middle of its epoch (its log.jsonl has the record of step 10 of 37)
    log = out / PREEMPTED / "log.jsonl"
    _wait(lambda: log.is_file() and any(r.get("kind") == "train" and r["step"] >= 10 for r in map(
        json.loads, log.read_text().splitlines())), 1800, f"{PREEMPTED} training")
    job_id = jobs[PREEMPTED]["job_id"]
    submitit.SlurmJob(folder=out / PREEMPTED / "jobs", job_id=job_id, tasks=(0, 1))._interrupt()

    def finished():
        states = [(r["name"], r["state"]) for r in collect(out)]
        return states if all(s.startswith(ENDED) for _, s in states) else None

    states = _wait(finished, DEADLINE_S, "every job of the suite")
    elapsed = time.time() - started
    assert {s for _, s in states} == {"COMPLETED"}, states
    assert _sacct(job_id, "State", "--duplicates", lines=2).split()[0] == "REQUEUED"
    err = _stderr(out / PREEMPTED, job_id)
    resumed = re.search(r"resuming from .*checkpoint\.pth: 0 of 1 epochs done and (\d+) of (\d+) steps", err)
    assert "this job is preempted" in err and resumed, err[-3000:]
    assert 10 <= int(resumed[1]) < int(resumed[2]), resumed[0]  # mid-epoch, where the signal found it

    written = sorted(out.rglob("results.json"))  # every step (and array element) ran on 2 processes
    assert len(written) == len(spec["steps"]) + 1, written
    for path in written:
        assert json.loads(path.read_text()).get("world_size") == 2, path
    rows = table_rows(spec, out)
    cells = [(row["label"], r["measured"]) for row, r in zip(spec["table"], rows) if row.get("step")]
    assert len(cells) == 14 and [label for label, value in cells if value is None] == []
    table = (out / "paper_table.md").read_text()
    for label, value in cells:
        assert f"| {label} | {value:.1f} |" in table
    print(f"paper-mini: {len(spec['steps'])} steps on SLURM in {elapsed / 60:.1f} min")
