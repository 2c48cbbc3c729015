"""Cluster profiles: named sets of SLURM resources, read from YAML, overridable field by field."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bam.cli import check_keys

BUILTIN_PROFILES = Path(__file__).with_name("profiles.yaml")


@dataclass(frozen=True)
class Profile:
    name: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    signal_delay_s: int = 120
    max_num_timeout: int = 3
    sbatch: dict = field(default_factory=dict)
    # what the plan check (eval/budget.py) assumes of the hardware: memory per GPU, achieved (not peak) TFLOP/s per
    # GPU with bf16/fp16 autocast and in fp32 (TF32 matmuls), and images decoded + augmented per CPU core per second
    gpu_mem_gb: float = 80.0
    tflops_per_gpu: float = 100.0
    fp32_tflops_per_gpu: float = 40.0
    images_per_cpu_s: float = 100.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def with_overrides(self, **overrides) -> Profile:
        """A copy with the given fields replaced; ``None`` values are ignored (flags the user did not pass)."""
        unknown = set(overrides) - FIELDS
        if unknown:
            raise ValueError(f"unknown profile fields {sorted(unknown)}; valid: {', '.join(sorted(FIELDS))}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "sbatch" in given:
            given["sbatch"] = {**self.sbatch, **given["sbatch"]}
        return dataclasses.replace(self, **given)

    def describe(self) -> str:
        parts = [f"partition={self.partition or '(default)'}", f"nodes={self.nodes}",
                 f"tasks/node={self.tasks_per_node}", f"gpus/node={self.gpus_per_node}",
                 f"cpus/task={self.cpus_per_task}", f"mem={self.mem_gb or '(default)'}G", f"time={self.time_min}min"]
        parts += [f"{k}={v}" for k in ("account", "qos", "constraint") if (v := getattr(self, k))]
        parts += [f"--{k}={v}" for k, v in self.sbatch.items()]
        return " ".join(parts)


FIELDS = {f.name for f in dataclasses.fields(Profile)} - {"name"}


def read_profiles(path: str | os.PathLike) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"profile file {path} does not exist; check --profile-file / $BAM_SLURM_PROFILES")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of profile name -> fields (see {BUILTIN_PROFILES})")
    for name, fields in data.items():
        check_keys(fields, FIELDS, f"{path}: profile {name!r}", "fields")
    return data


def known_profiles(profile_file: str | os.PathLike | None = None) -> dict[str, dict]:
    """Built-in profiles, then ``$BAM_SLURM_PROFILES``, then ``profile_file`` (later files win by name)."""
    profiles = read_profiles(BUILTIN_PROFILES)
    for extra in (os.environ.get("BAM_SLURM_PROFILES"), profile_file):
        if extra:
            profiles.update(read_profiles(extra))
    return profiles


def load_profile(name: str, profile_file: str | os.PathLike | None = None, **overrides) -> Profile:
    profiles = known_profiles(profile_file)
    if name not in profiles:
        raise ValueError(f"unknown --profile {name!r}; known: {', '.join(sorted(profiles))} "
                         f"(add yours with --profile-file FILE.yaml)")
    return Profile(name=name, **profiles[name]).with_overrides(**overrides)
