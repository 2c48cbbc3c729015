"""COCO-format data for detection: checks with one-line errors, a dataset yielding torchvision targets, and
pycocotools' COCOeval as metrics (``bbox/AP``, ..., ``segm/APl`` on the 0-100 scale)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _quiet(fn, *args, **kwargs):
    """pycocotools prints; keep its chatter out of the logs."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_coco(annotation_file: Path, image_dir: Path, require_instances: bool = True) -> COCO:
    """Read and check a COCO instances file: readable JSON with images / annotations / categories, every image file
    present, every category with at least one instance (``require_instances``)."""
    if not annotation_file.is_file():
        raise FileNotFoundError(f"annotation file {annotation_file} does not exist; expected the COCO layout "
                                f"<data>/annotations/instances_<split>.json")
    try:
        data = json.loads(annotation_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{annotation_file} is not JSON ({e})") from None
    missing_keys = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing_keys:
        raise ValueError(f"{annotation_file} is not a COCO instances file (no {', '.join(missing_keys)})")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist (named after the split, as COCO's "
                                f"train2017/ and val2017/)")
    absent = [im["file_name"] for im in data["images"] if not (image_dir / im["file_name"]).is_file()]
    if absent:
        raise FileNotFoundError(f"{annotation_file}: {len(absent)} image files missing from {image_dir}, e.g. "
                                f"{', '.join(absent[:3])}")
    known_ids = {c["id"] for c in data["categories"]}
    unknown = sorted({a["category_id"] for a in data["annotations"]} - known_ids)
    if unknown:
        raise ValueError(f"{annotation_file}: annotations use category ids {unknown[:5]} that 'categories' does not "
                         f"list (it lists {sorted(known_ids)[:8]}{' ...' if len(known_ids) > 8 else ''}); add them "
                         "to 'categories' or drop those annotations")
    unknown_images = sorted({a["image_id"] for a in data["annotations"]} - {im["id"] for im in data["images"]})
    if unknown_images:
        raise ValueError(f"{annotation_file}: annotations refer to image ids {unknown_images[:5]} that 'images' does "
                         "not list; the file is inconsistent")
    if require_instances:
        used = {a["category_id"] for a in data["annotations"]}
        empty = [c["name"] for c in data["categories"] if c["id"] not in used]
        if empty:
            raise ValueError(f"{annotation_file}: categories without instances: {', '.join(empty[:5])}; remove them "
                             f"from 'categories' (AP is undefined for them)")
    coco = COCO()
    coco.dataset = data
    _quiet(coco.createIndex)
    return coco


class CocoInstances(torch.utils.data.Dataset):
    """Images with torchvision detection targets: ``boxes`` (xyxy), ``labels`` (1..C, contiguous over the sorted
    category ids), ``masks`` ``[N, H, W]`` uint8. Crowd annotations are left out; with ``train`` images without
    any instance are skipped (as detectron2 does) and a horizontal flip is applied with probability 0.5."""

    def __init__(self, coco: COCO, image_dir: Path, train: bool):
        self.coco, self.image_dir, self.train = coco, image_dir, train
        self.cat_ids = sorted(coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        ids = sorted(coco.getImgIds())
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in coco.imgToAnns[i])]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        with Image.open(self.image_dir / info["file_name"]) as im:
            image = TF.to_dtype(TF.to_image(im.convert("RGB")), torch.float32, scale=True)
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0) and a["bbox"][2] > 0
                and a["bbox"][3] > 0]
        h, w = image.shape[-2:]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
            torch.zeros(0, h, w, dtype=torch.uint8)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                         dtype=torch.int64),
                  "masks": masks, "image_id": image_id}
        if self.train and torch.rand(()) < 0.5:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            target.update(boxes=boxes, masks=masks)
        return image, target


def collate(batch):
    return tuple(zip(*batch))


def to_coco_results(outputs: list[dict], image_ids: list[int], cat_ids: list[int], mask_threshold: float = 0.5
                    ) -> list[dict]:
    """torchvision Mask R-CNN outputs -> COCO result dicts (xywh boxes, RLE masks, category ids)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].cpu().numpy()
        masks = (out["masks"][:, 0] > mask_threshold).cpu().numpy() if "masks" in out else None
        for i, (score, label) in enumerate(zip(out["scores"].tolist(), out["labels"].tolist())):
            x0, y0, x1, y1 = boxes[i].tolist()
            det = {"image_id": image_id, "category_id": cat_ids[label - 1], "score": score,
                   "bbox": [x0, y0, x1 - x0, y1 - y0]}
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
                det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(det)
    return results


def coco_metrics(coco_gt: COCO, results: list[dict], iou_types=("bbox", "segm")) -> dict[str, float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl per IoU type, on the 0-100 scale (``bbox/AP``, ...).

    No detections at all is a valid answer (AP 0), evaluated as such rather than rejected as pycocotools does."""
    metrics = {}
    for iou_type in iou_types:
        if results:
            coco_dt = _quiet(coco_gt.loadRes, results)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                               "annotations": []}
            _quiet(coco_dt.createIndex)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        _quiet(evaluator.evaluate)
        _quiet(evaluator.accumulate)
        _quiet(evaluator.summarize)
        for name, value in zip(STAT_NAMES, evaluator.stats[:6]):
            metrics[f"{iou_type}/{name}"] = 100.0 * float(value) if value >= 0 else None  # -1: no such objects
    return metrics
