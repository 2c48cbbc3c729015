import os

import pytest


@pytest.fixture(scope="session")
def detectron2():
    """detectron2, imported with what the engine needs beside it; skips without it (it is not on PyPI), unless
    $BAM_REQUIRE_DETECTRON2=1 (CI, which installs the wheel in ../shared/wheels), where it fails."""
    try:
        import detectron2
        import detectron2.model_zoo  # noqa: F401 - imports pkg_resources (setuptools < 81)
        import shapely  # noqa: F401 - fvcore crops polygons with it in ViTDet's large-scale jitter
    except ImportError as e:
        why = ("detectron2 is not installed (not on PyPI: build it from source, see the README's COCO section)"
               if e.name == "detectron2" else f"detectron2 lacks {e.name}: pip install 'setuptools<81' shapely")
        if os.environ.get("BAM_REQUIRE_DETECTRON2") == "1":
            pytest.fail(f"BAM_REQUIRE_DETECTRON2=1 but {why}")
        pytest.skip(why)
    return detectron2
