"""The import layering of setup.cfg's [importlinter] (bam <- pretrain | transfer | slurm <- eval) holds: the same
check CI runs, here so that the README's test command catches a back-edge too."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe) if exe.is_file() else shutil.which("lint-imports"), "--no-cache"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
