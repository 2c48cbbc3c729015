"""DAVIS-2017 semi-supervised video object segmentation by label propagation (DINO's protocol): frames and
annotations (``data``), the propagation (``propagation``) and davis2017-evaluation's J and F (``scoring``)."""
