import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bam import build_backbone
from bam.formats import backbone_checkpoint
from pretrain.main import main as pretrain_main

from ..conftest import TINY_VIT, make_digit_folders, tiny_args

LOCAL_CLUSTER_CONF = Path(os.environ.get("BAM_SLURM_DIR", "/var/tmp/bam-slurm")) / "slurm.conf"


def cluster_missing() -> str | None:
    """Why no SLURM cluster answers here (None when one does)."""
    if not shutil.which("sbatch"):
        return "sbatch is not installed (apt-get install munge slurmctld slurmd slurm-client slurmdbd mariadb-server)"
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists() and LOCAL_CLUSTER_CONF.exists():
        os.environ["SLURM_CONF"] = str(LOCAL_CLUSTER_CONF)
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    if done.returncode != 0 or "up" not in done.stdout:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no partition up"
        return f"no SLURM cluster answers ({why}); start one: slurm/local_cluster.sh up"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running SLURM cluster; skips without one, unless $BAM_REQUIRE_SLURM=1 (CI), where it fails."""
    why = cluster_missing()
    if why:
        if os.environ.get("BAM_REQUIRE_SLURM") == "1":
            pytest.fail(f"BAM_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def uninterrupted_pretrain(tiny_folder, tmp_path_factory):
    """The tiny pretraining run (6 epochs) in this process: what every launched variant must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert pretrain_main(tiny_args(tiny_folder, out, epochs=6)) == 0
    return out


# a preempted job must still be training when both of SLURM's signals reach it (each is an scancel round trip):
# long enough that they do on a loaded machine (the 6-epoch run is over in about a second)
PREEMPTED_EPOCHS = 30


@pytest.fixture(scope="session")
def uninterrupted_long_pretrain(tiny_folder, tmp_path_factory):
    """The tiny pretraining run over PREEMPTED_EPOCHS epochs, in this process."""
    out = tmp_path_factory.mktemp("uninterrupted-long")
    assert pretrain_main(tiny_args(tiny_folder, out, epochs=PREEMPTED_EPOCHS)) == 0
    return out


@pytest.fixture(scope="session")
def knn_argv(tmp_path_factory):
    """A k-NN evaluation that takes seconds: a tiny ViT checkpoint on 3 classes of digits."""
    root = tmp_path_factory.mktemp("knn")
    make_digit_folders(root / "data")
    torch.manual_seed(0)
    torch.save(backbone_checkpoint(build_backbone("vit_small_patch16_224", **TINY_VIT)), root / "tiny.pth")
    return ["--task", "knn", "--data", str(root / "data"), "--checkpoint", str(root / "tiny.pth"),
            "--image-size", "32", "--k", "5,20", "--num-workers", "0"]

