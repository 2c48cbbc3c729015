"""``python eval/run.py --task semisup``: semi-supervised classification from 1% / 10% of the training labels.

Subsets come from SimCLR's split files (``--split-file``, one training image file name per line, e.g.
``n01440764_10026.JPEG``) or, without one, a deterministic class-balanced subset (recorded as such in
results.json). Protocols: ``logreg`` (scikit-learn logistic regression on frozen [CLS] features, C chosen by
stratified cross-validation on the subset) and ``finetune`` (the fine-tuning recipe of ``--task finetune`` on the
subset). Both are evaluated on the whole ``val/``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Subset

from bam.cli import number, number_list, parse_list, resolve_defaults
from bam.images import labelled_splits
from bam.samples.photos import photos_sample
from bam.training import amp_dtype
from eval.budget import IMAGENET_TRAIN, IMAGENET_VAL, Workload
from eval.context import TaskContext
from eval.tasks import TaskSpec
from eval.tasks import finetune as finetune_task
from transfer.classification.finetune import finetune, train_dataset
from transfer.classification.splits import balanced_subset, read_split_file
from transfer.features import cached_slots

logger = logging.getLogger(__name__)
HELP = "semi-supervised 1% / 10%: logistic regression on frozen features or fine-tuning on a labelled subset"
DEFAULTS = {"fractions": "0.01,0.1", "protocol": "logreg", "logreg_c": "0.01,0.1,1,10", "extract_batch_size": 64}
# fine-tuning on a few images per class: more, smaller steps than --task finetune's sample setting
SAMPLE_FINETUNE = {**finetune_task.SAMPLE, "epochs": 15, "batch_size": 32}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--fractions", type=number_list(float, gt=0, le=1), default=None,
                       help="comma-separated label fractions")
    group.add_argument("--split-file", default=None,
                       help="SimCLR split files (comma-separated, one per fraction, same order), e.g. "
                            "1percent.txt,10percent.txt; without: class-balanced subsets drawn with --seed")
    group.add_argument("--protocol", default=None, choices=["logreg", "finetune"],
                       help="logreg: scikit-learn logistic regression on frozen [CLS] features; "
                            "finetune: the --task finetune recipe on the subset (its flags apply)")
    group.add_argument("--logreg-c", type=number_list(float, gt=0), default=None,
                       help="inverse regularisation strengths tried by stratified "
                       "cross-validation on the subset")
    group.add_argument("--extract-batch-size", type=number(int, ge=1), default=None,
                       help="images per forward pass")
    finetune_task.add_arguments(group)


def builtin_sample(cache_dir: Path) -> Path:
    return photos_sample(cache_dir)


def subsets(train_set, args: argparse.Namespace) -> list[dict]:
    """One ``{"fraction", "indices", "source"}`` per requested fraction."""
    fractions = parse_list(args.fractions, float, "--fractions")
    files = parse_list(args.split_file, str, "--split-file") if args.split_file else []
    if files and len(files) != len(fractions):
        raise ValueError(f"--split-file names {len(files)} files for {len(fractions)} --fractions; give one per "
                         f"fraction, in the same order")
    out = []
    for i, fraction in enumerate(fractions):
        if files:
            idx = read_split_file(files[i], train_set.samples, train_set.class_to_idx)
            source = f"split file {Path(files[i]).resolve()}"
        else:
            idx = balanced_subset(train_set.targets, fraction, args.seed)
            source = f"class-balanced subset, seed {args.seed} (no --split-file)"
        logger.info("%g%% of the labels: %d images (%s)", 100 * fraction, len(idx), source)
        out.append({"fraction": fraction, "indices": idx, "source": source})
    return out


def logistic_regression(train_x: np.ndarray, train_y: np.ndarray, cs: list[float], seed: int):
    """Standardise + multinomial logistic regression; C by stratified k-fold (k <= 3) when every class has two
    images or more, else the middle of ``cs``. Returns (fitted model, chosen C, how it was chosen)."""
    counts = np.bincount(train_y)
    min_count = counts[counts > 0].min()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    if len(cs) > 1 and min_count >= 2:
        search = GridSearchCV(model, {"logisticregression__C": cs},
                              cv=StratifiedKFold(min(3, int(min_count)), shuffle=True, random_state=seed))
        search.fit(train_x, train_y)
        return search.best_estimator_, search.best_params_["logisticregression__C"], \
            f"{search.n_splits_}-fold stratified cross-validation"
    c = cs[len(cs) // 2]
    model.set_params(logisticregression__C=c).fit(train_x, train_y)
    return model, c, "default (a class has a single image: no cross-validation)" if len(cs) > 1 else "given"


def topk_accuracy(probs: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    order = classes[np.argsort(-probs, axis=1)[:, :5]]
    hits = order == labels[:, None]
    return {"top1": 100.0 * hits[:, 0].mean(), "top5": 100.0 * hits.any(axis=1).mean()}


def run(ctx: TaskContext, args: argparse.Namespace) -> dict:
    resolve_defaults(args, DEFAULTS)
    if args.protocol == "finetune":
        resolve_defaults(args, finetune_task.DEFAULTS, finetune_task.PRESETS.get(args.preset),
                         SAMPLE_FINETUNE if ctx.is_sample else None)
        amp_dtype(args.amp, ctx.device)  # fp16 without CUDA: refused before any data is read
    else:
        args.image_size = args.image_size or 224
        args.num_workers = args.num_workers if args.num_workers is not None else 2
    train_set, val_set = labelled_splits(ctx.data_root, args.image_size)
    parts = subsets(train_set, args)
    metrics, details = {}, []
    if args.protocol == "logreg":
        cs = parse_list(args.logreg_c, float, "--logreg-c")
        backbone = ctx.load_backbone().to(ctx.device).eval()
        # only the labelled images are needed: 10 % of the training set, not all of it
        labelled = sorted({i for part in parts for i in part["indices"]})
        row = {image: r for r, image in enumerate(labelled)}
        feats = {}
        for name, dataset in (("train", Subset(train_set, labelled)), ("val", val_set)):
            slots, labels = cached_slots(ctx.feature_cache, ctx.model_id(), backbone, dataset, ctx.device,
                                         args.extract_batch_size, args.num_workers, 1, name)
            feats[name] = F.normalize(slots[:, 0], dim=1).numpy(), labels.numpy()
        for part in parts:
            rows = [row[i] for i in part["indices"]]
            x, y = feats["train"][0][rows], feats["train"][1][rows]
            model, c, how = logistic_regression(x, y, cs, args.seed)
            res = topk_accuracy(model.predict_proba(feats["val"][0]), model.classes_, feats["val"][1])
            details.append({**{k: v for k, v in part.items() if k != "indices"}, "num_images": len(x), "C": c,
                            "C_selected_by": how, **res})
            tag = f"{100 * part['fraction']:g}pct"
            metrics[f"top1_{tag}"], metrics[f"top5_{tag}"] = res["top1"], res["top5"]
            logger.info("%s: top-1 %.2f%% (C=%g, %s)", tag, res["top1"], c, how)
    else:
        full = train_dataset(Path(train_set.root), args)
        for part in parts:
            tag = f"{100 * part['fraction']:g}pct"
            out_dir = ctx.output_dir / tag
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(args.seed)
            out = finetune(ctx.load_backbone(), Subset(full, part["indices"]), val_set, len(train_set.classes), args,
                           ctx.device, out_dir, {"model": ctx.model_id(), "recipe": finetune_task.recipe(args),
                                                 "data": str(ctx.data_root.resolve()), "subset": part["indices"]})
            details.append({**{k: v for k, v in part.items() if k != "indices"}, "num_images": len(part["indices"]),
                            "top1": out["top1"], "top5": out["top5"], "history": out["history"]})
            metrics[f"top1_{tag}"], metrics[f"top5_{tag}"] = out["top1"], out["top5"]
    return {"metrics": metrics, "subsets": details, "protocol": args.protocol, "num_val": len(val_set),
            "classes": train_set.classes}


def workload(args: argparse.Namespace, arch: str, world: int) -> Workload:
    resolve_defaults(args, DEFAULTS)
    labelled = round(sum(parse_list(args.fractions, float, "--fractions")) * IMAGENET_TRAIN)  # one subset after another
    if args.protocol == "finetune":
        return finetune_task.workload(args, arch, world, labelled)
    args.image_size = size = args.image_size or 224  # run()'s extraction crop
    return Workload(arch, ((1, size, size),), args.extract_batch_size, 1, args.extract_batch_size * world,
                    images=labelled + IMAGENET_VAL, memory_fixes=("a smaller --extract-batch-size",),
                    note="frozen: the labelled images and val/ once; the logistic regression (CPU) is not counted")


SPEC = TaskSpec(name="semisup", help=HELP, headline="top1_", add_arguments=add_arguments,
                builtin_sample=builtin_sample, run=run,
                defaults=DEFAULTS, sample=SAMPLE_FINETUNE, suite_args={"cache_features": True}, workload=workload,
                distributed=True)  # logreg: extraction sharded over ranks; finetune: DDP on the global batch
