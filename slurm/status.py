"""``--status DIR``: every job submitted under DIR (a run or a suite), its state and where its results are."""
from __future__ import annotations

import json
import os
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths

from slurm.launch import JOB_RECORD
from slurm.outcome import read_outcome


def job_state(folder: str | os.PathLike, job_id: str, launcher: str) -> str:
    """COMPLETED / FAILED from submitit's result file when there is one, else SLURM's state (``sacct``), else
    RUNNING or GONE for a local job by its controller process."""
    result = JobPaths(folder, job_id, task_id=0).result_pickle
    if result.is_file():
        outcome = read_outcome(result)  # never plain pickle.load: a crafted result file would run code
        if outcome is None:
            return "FINISHED"  # ended, with a result that is not plain data
        return "COMPLETED" if outcome[0] == "success" else "FAILED"
    if launcher == "slurm":
        return submitit.SlurmJob(folder, job_id).state
    if launcher == "local":
        try:
            os.kill(int(job_id), 0)
            return "RUNNING"
        except (OSError, ValueError):
            return "GONE"  # the submitting process ended before the job (a local job does not outlive it)
    return "UNKNOWN"


def collect(root: str | os.PathLike) -> list[dict]:
    """One row per job under ``root``: name (folder relative to root), job id, launcher, state, results."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--status {root} is not a folder; pass the --output-dir of a launched run or suite")
    rows = []
    for record_path in sorted(root.rglob(JOB_RECORD)):
        record = json.loads(record_path.read_text())
        for job in record["jobs"]:
            out = Path(job["output_dir"])
            results = out / "results.json"
            name = str(out.relative_to(root)) if out.is_relative_to(root) else str(out)
            if name == ".":  # the run launched at root itself, or a suite's table / report job
                name = "(suite table / report)" if "--render" in job["argv"] else root.resolve().name
            rows.append({"name": name,
                         "job_id": job["job_id"], "launcher": record["launcher"],
                         "state": job_state(record["folder"], job["job_id"], record["launcher"]),
                         "resources": record["resources"], "dependency": record.get("dependency"),
                         "results": str(results) if results.is_file() else None})
    if not rows:
        raise FileNotFoundError(f"--status {root}: no {JOB_RECORD} below it; was anything launched there?")
    return rows


def format_status(rows: list[dict]) -> str:
    header = ("job", "id", "state", "results")
    table = [header] + [(r["name"], r["job_id"], r["state"], r["results"] or "-") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
