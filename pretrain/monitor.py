"""Where training numbers go: a JSON-lines file, TensorBoard events, and W&B when asked (rank 0 only)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class Monitor:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None):
        self.enabled = enabled
        self.path = output_dir / "log.jsonl"
        self.tb = self.run = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise ValueError("--wandb true needs the wandb package: pip install -e '.[wandb]'") from None
            self.run = wb.init(project="bam", config=config, dir=str(output_dir), resume="allow")

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.run is not None:
            self.run.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.run is not None:
            self.run.finish()
