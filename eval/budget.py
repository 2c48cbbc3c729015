"""What a suite's steps will ask of the cluster, checked before anything is submitted (``--suite NAME --dry-run``).

Per step: processes (nodes x tasks), the global batch, the images one process forwards at once (its micro-batch)
and the accumulation that makes the global batch, the precision; then two estimates against the step's profile:

- **peak GPU memory per process**: one real forward (and backward, for a trained model) of the step's backbone on its
  micro-batch and input sizes, run under ``FakeTensorMode`` (no memory, no compute) while :class:`LiveBytes` counts
  every tensor storage alive (weights, activations kept for backward, gradients, temporaries) at the peak; plus
  the optimizer's state (AdamW: two fp32 copies of the trainable weights, SGD: one), the weights beside the backbone
  (a projector, an EMA teacher). Heads that the probe does not build (detection and segmentation heads) are named in
  the step's note: their memory is not in the figure.
- **wall time**: the FLOPs ``FlopCounterMode`` counts in that forward/backward, times the images of the whole run,
  over the GPUs at the profile's ``tflops_per_gpu`` (mixed precision) or ``fp32_tflops_per_gpu``; or, when image
  decoding is slower, the images over the CPUs at the profile's ``images_per_cpu_s``. Profiles say what their GPUs
  achieve; set yours with ``--profile-file``.

A step fits when its memory is within the profile's ``gpu_mem_gb`` and its time within ``time_min`` x
(1 + ``max_num_timeout``) for a task that resumes from its checkpoint after a requeue, ``time_min`` for one that
starts over. A step that does not fit fails the dry run with one line naming the step, the figure and the fix.
"""
from __future__ import annotations

import argparse
import functools
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from bam.backbones import build_backbone
from slurm.profiles import Profile

# the data sets' sizes at paper scale (images a pass reads)
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000  # ILSVRC-2012 (Russakovsky et al., IJCV 2015)
DAVIS_VAL_FRAMES = 1_999  # DAVIS-2017 val: 30 sequences (Pont-Tuset et al., arXiv:1704.00675)
COCO_VAL = 5_000  # val2017
ADE20K_VAL = 2_000  # ADEChallengeData2016 validation
OPTIMIZER_COPIES = {"adamw": 2, "sgd": 1, None: 0}  # fp32 state tensors per trainable weight


@dataclass(frozen=True)
class Workload:
    """What one step does, in the terms the estimates need (a task's ``TaskSpec.workload`` builds it)."""
    arch: str
    inputs: tuple[tuple[int, int, int], ...]  # (crops per image, height, width) of what every image gives
    micro_batch: int                          # images per forward pass on one process
    accum: int                                # micro-batches per optimizer step on one process
    global_batch: int                         # images per optimizer step, all processes
    images: int                               # images trained on (forward + backward) or, frozen, forwarded
    eval_images: int = 0                      # images only forwarded besides (validation passes)
    trains: bool = False                      # the backbone is trained (backward, gradients, optimizer state)
    optimizer: str | None = None              # adamw | sgd
    precision: str = "none"                   # none | bf16 | fp16
    resumable: bool = False                   # a requeued job goes on from its checkpoint
    grad_checkpointing: bool = False
    extra_params: int = 0                     # trained weights beside the backbone (a projector)
    teacher: bool = False                     # an EMA copy of the weights
    memory_fixes: tuple[str, ...] = ()       # what the user can change when it does not fit a GPU
    note: str = ""
    arch_kwargs: tuple[tuple[str, object], ...] = ()  # the backbone's build arguments (a pretraining config's)


@dataclass
class Estimate:
    step: str
    workload: Workload
    profile: Profile
    peak_gib: float
    hours: float
    limit_hours: float
    problems: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return self.hours * max(self.profile.nodes * self.profile.gpus_per_node, 1)

    def describe(self) -> str:
        w, p = self.workload, self.profile
        if not p.gpus_per_node:
            return f"  {self.step}: profile {p.name} has no GPU: not checked"
        lines = [f"  {self.step}: {p.nodes}x{p.gpus_per_node} GPUs ({p.world_size} processes), batch {w.global_batch}"
                 f" = {p.world_size} x {w.micro_batch}{f' x {w.accum} accumulated' if w.accum > 1 else ''}, "
                 f"{'fp32' if w.precision == 'none' else w.precision}, {w.arch}",
                 f"      peak {self.peak_gib:.1f} GiB/GPU of {p.gpu_mem_gb:g}; {self.hours:.1f} h "
                 f"({self.gpu_hours:,.1f} GPU-hours) of {self.limit_hours:.0f} h "
                 f"({p.time_min / 60:g} h x {1 + p.max_num_timeout if w.resumable else 1}"
                 f"{' runs, resumed' if w.resumable else ' run, starts over if requeued'})"]
        if w.note:
            lines.append(f"      note: {w.note}")
        return "\n".join(lines)


class LiveBytes(TorchDispatchMode):
    """The bytes of every tensor storage alive, and their peak, as ops create and free them (a dispatch mode: it sees
    the forward, the backward and the gradients; storages added by :meth:`add` count from the start)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = self._seen[storage] = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


@functools.cache
def probe(arch: str, arch_kwargs: tuple[tuple[str, object], ...], inputs: tuple[tuple[int, int, int], ...],
          micro_batch: int, trains: bool, precision: str, grad_checkpointing: bool) -> tuple[int, float, float, int]:
    """(peak bytes, forward FLOPs per image, backward FLOPs per image, weights) of one forward (and backward) of
    ``arch`` on ``micro_batch`` images of every input size, run under ``FakeTensorMode`` (nothing computed, nothing
    allocated): :class:`LiveBytes` counts the weights, activations, gradients and temporaries alive at the peak,
    ``FlopCounterMode`` the FLOPs. The weights are built on the meta device (no initialisation)."""
    with torch.device("meta"):
        backbone = build_backbone(arch, **dict(arch_kwargs))
    backbone = backbone.to_empty(device="cpu").train(trains)
    if grad_checkpointing:
        backbone.model.set_grad_checkpointing(True)
    weights = sum(p.numel() for p in backbone.parameters())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            outs = [backbone(torch.randn(micro_batch * n, 3, h, w)) for n, h, w in inputs]
        return sum(o.float().sum() for o in outs)

    with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(trains):
        memory = LiveBytes()
        for p in [*backbone.parameters(), *backbone.buffers()]:
            memory.add(p)
        with memory:  # a pass of its own: FlopCounterMode's module hooks would change what checkpointing keeps
            loss = step()
            if trains:
                loss.backward()
            del loss
        backbone.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as forward:
            loss = step()
        with FlopCounterMode(display=False) as backward:
            if trains:
                loss.backward()
    return memory.peak, forward.get_total_flops() / micro_batch, backward.get_total_flops() / micro_batch, weights


def estimate(step: str, w: Workload, profile: Profile) -> Estimate:
    limit = profile.time_min / 60 * (1 + profile.max_num_timeout if w.resumable else 1)
    gpus = profile.nodes * profile.gpus_per_node
    if gpus == 0:  # a CPU profile (the local test cluster): nothing to check against
        return Estimate(step, w, profile, 0.0, 0.0, limit)
    try:
        peak, fwd, bwd, weights = probe(w.arch, w.arch_kwargs, w.inputs, w.micro_batch, w.trains, w.precision,
                                        w.grad_checkpointing)
    except (AssertionError, RuntimeError, ValueError) as e:  # the step's run would fail the same way
        sizes = ", ".join(f"{h} x {w_}" for _, h, w_ in w.inputs)
        raise ValueError(f"step {step}: {w.arch} cannot run on its inputs ({sizes}): {str(e).strip()}") from e
    if w.trains:  # the optimizer's state, and the weights (their gradients, their state) the probe does not build
        peak += 4 * weights * OPTIMIZER_COPIES[w.optimizer] + 4 * w.extra_params * (2 + OPTIMIZER_COPIES[w.optimizer])
    if w.teacher:
        peak += 4 * (weights + w.extra_params)
    flops = (fwd + bwd) * w.images + fwd * w.eval_images
    rate = profile.tflops_per_gpu if w.precision in ("bf16", "fp16") else profile.fp32_tflops_per_gpu
    compute_s = flops / (max(gpus, 1) * rate * 1e12)
    decode_s = (w.images + w.eval_images) / (profile.world_size * profile.cpus_per_task * profile.images_per_cpu_s)
    hours = max(compute_s, decode_s) / 3600
    est = Estimate(step, w, profile, peak / 2**30, hours, limit)
    if est.peak_gib > profile.gpu_mem_gb:
        fixes = " or ".join(w.memory_fixes) or "a GPU with more memory"
        est.problems.append(f"step {step}: needs about {est.peak_gib:.0f} GiB per GPU, profile {profile.name} has "
                            f"{profile.gpu_mem_gb:g}; use {fixes}")
    if hours > limit:
        how = "more GPUs, a longer time_min" + (" or more requeues (max_num_timeout)" if w.resumable else "")
        est.problems.append(f"step {step}: needs about {hours:.1f} h, profile {profile.name} allows {limit:.1f} h "
                            f"({profile.time_min} min x {1 + profile.max_num_timeout if w.resumable else 1}); "
                            f"give it {how}")
    return est


def step_args(add_arguments, argv: list[str]) -> argparse.Namespace:
    """The values of one entry point's own flags in ``argv`` (``add_arguments`` declares them; every other flag of
    the step is left aside)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_arguments(parser.add_argument_group())
    return parser.parse_known_args(argv)[0]


def pretrain_workload(argv: list[str], world: int) -> Workload:
    """BAM pretraining's step: the student forward/backward on every crop, an EMA teacher, the projector."""
    from bam.projector import Projector
    from pretrain.main import parse_args

    args = parse_args(argv)
    with torch.device("meta"):
        embed_dim = build_backbone(args.arch, **args.arch_kwargs).embed_dim
    projector = Projector(embed_dim, args.proj_hidden_dim, args.proj_out_dim, args.proj_layers, args.proj_norm,
                          args.proj_act, args.proj_last_norm)
    inputs = ((2, args.global_size, args.global_size),) + \
        (((args.n_local, args.local_size, args.local_size),) if args.n_local else ())
    copies = "sgd" if args.optimizer in ("sgd", "lars") else args.optimizer  # LARS keeps one momentum buffer
    return Workload(args.arch, inputs, args.batch_size_per_gpu, 1, args.batch_size_per_gpu * world,
                    images=args.epochs * IMAGENET_TRAIN, trains=True, optimizer=copies, precision=args.amp,
                    resumable=True, grad_checkpointing=args.grad_checkpointing,
                    extra_params=sum(p.numel() for p in projector.parameters()), teacher=args.teacher,
                    memory_fixes=("more GPUs (a smaller --batch-size-per-gpu at the same global batch)",
                                  "--grad-checkpointing") + (("--amp bf16",) if args.amp == "none" else ()),
                    note="the teacher's forward and the loss's Sinkhorn are not in the time",
                    arch_kwargs=tuple(sorted(args.arch_kwargs.items())))


def format_estimates(estimates: list[Estimate]) -> str:
    lines = ["plan check (peak memory: one forward/backward under FakeTensorMode, live storages, plus optimizer state; "
             "time: its FLOPs x the run's images at the profile's throughput; eval/budget.py):"]
    for e in estimates:
        lines.append(e.describe())
        lines += [f"      DOES NOT FIT: {p}" for p in e.problems]
    total = sum(e.gpu_hours for e in estimates if e.profile.gpus_per_node)
    lines.append(f"  total: {total:,.0f} GPU-hours")
    return "\n".join(lines)


def first_problem(estimates: list[Estimate]) -> str | None:
    """One line for the dry run to fail with: the first step that does not fit (and how many others do not)."""
    problems = [p for e in estimates for p in e.problems]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more: see the plan check above)" if len(problems) > 1 else ""
    return problems[0] + more
