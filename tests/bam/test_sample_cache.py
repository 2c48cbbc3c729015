import multiprocessing as mp
import time
from pathlib import Path

from bam.samples.cache import ensure_generated


def _slow_sample(folder: Path) -> None:
    time.sleep(0.3)
    (folder / "data.txt").write_text("sample")


def _generate(root: str) -> None:
    ensure_generated(Path(root) / "sample", _slow_sample)


def test_two_processes_generating_at_once_leave_one_complete_sample(tmp_path):
    procs = [mp.get_context("fork").Process(target=_generate, args=(str(tmp_path),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(f.name for f in (tmp_path / "sample").iterdir()) == [".complete", "data.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]  # no temporary folder left behind


def test_an_interrupted_generation_leaves_nothing(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise KeyboardInterrupt

    try:
        ensure_generated(tmp_path / "sample", broken)
    except KeyboardInterrupt:
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_generated_sample_is_readable_as_the_umask_says(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        target = ensure_generated(tmp_path / "sample", _slow_sample)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700: unreadable to colleagues
