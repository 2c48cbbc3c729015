import numpy as np
from PIL import Image

from bam.samples import photos


def test_photo_crops_sample_layout(tmp_path):
    photos.generate(tmp_path)
    for split, count in (("train", 120), ("val", 40)):
        classes = sorted(p.name for p in (tmp_path / split).iterdir())
        assert classes == sorted(photos.SOURCES)
        for c in classes:
            files = sorted((tmp_path / split / c).glob("*.png"))
            assert len(files) == count
    with Image.open(tmp_path / "train" / "coffee" / "000.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        assert np.asarray(im).std() > 1  # real image content, not a blank
    assert "not ImageNet" in (tmp_path / "README.md").read_text()
