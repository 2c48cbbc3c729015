import hashlib

import numpy as np
from PIL import Image

from bam.samples import davis as sample
from bam.samples.cache import ensure_generated


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".complete":
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_sample_layout_masks_and_determinism(tmp_path):
    a = ensure_generated(tmp_path / "a", sample.generate)
    assert (a / ".complete").is_file() and "NOT the DAVIS-2017 data set" in (a / "README.md").read_text()
    names = (a / "ImageSets/2017/val.txt").read_text().split()
    assert names == list(sample.SEQUENCES) and len(names) >= 4
    n_objects = set()
    for name in names:
        frames = sorted((a / "JPEGImages/480p" / name).glob("*.jpg"))
        masks = sorted((a / "Annotations/480p" / name).glob("*.png"))
        assert 20 <= len(frames) <= 40 and [f.stem for f in frames] == [m.stem for m in masks]
        with Image.open(frames[0]) as im:
            assert im.size == (854, 480)
        with Image.open(masks[0]) as im:
            assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]  # DAVIS colour of object 1
            first = np.array(im)
        n = int(first.max())
        n_objects.add(n)
        assert set(np.unique(first)) == set(range(n + 1))  # every object visible in the first frame
        visible = np.array([[(np.array(Image.open(m)) == k).sum() for k in range(1, n + 1)] for m in masks])
        assert (visible.max(0) > 2000).all()  # objects are big enough to track at 480p
        if name == "coins-gravel":
            assert (visible.min(0) < 0.8 * visible.max(0)).any()  # coins pass in front of one another
    assert n_objects == {1, 2, 3}
    b = tmp_path / "b"
    b.mkdir()
    sample.generate(b)
    assert _digest(a) == _digest(b) != ""


def test_palette_is_davis_colour_map():
    pal = sample.davis_palette()
    assert pal[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] and len(pal) == 768
