import numpy as np
import pytest
from PIL import Image

from .davis_fixtures import moving_ellipses, write_sequence


@pytest.fixture
def davis_root(tmp_path):
    """Two short sequences (1 and 2 moving ellipses, 6 frames of 64 x 96) in the DAVIS-2017 layout."""
    root = tmp_path / "DAVIS"
    rng = np.random.default_rng(0)
    for name, n_obj in (("alpha", 1), ("beta", 2)):
        labels = moving_ellipses(64, 96, 6, n_obj, rng)
        write_sequence(root / "Annotations" / "480p", name, labels)
        img_dir = root / "JPEGImages" / "480p" / name
        img_dir.mkdir(parents=True)
        for t, lab in enumerate(labels):
            rgb = np.stack([lab * 80 + 40, 120 - lab * 30, 60 + lab * 50], -1).astype(np.uint8)
            Image.fromarray(rgb).save(img_dir / f"{t:05d}.jpg")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\nbeta\n")
    return root
