"""What every stage receives: the resolved config, the run layout, and how to run.

Torch is imported only when a stage asks for a device or threads, so the storage layer and
``grasp --help`` / ``grasp status`` never pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grasp_cli.artifacts.layout import RunLayout
from grasp_cli.artifacts.shards import ShardSpec
from grasp_cli.config import GraspConfig


@dataclass
class StageContext:
    config: GraspConfig
    layout: RunLayout
    force: bool = False
    shard: ShardSpec = field(default_factory=ShardSpec)
    progress: bool = True
    # keys this command set on its command line (--set and config flags): remembered by the run
    command_line: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        device = self.config.run.device
        if device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return device

    def apply_threads(self) -> None:
        if self.config.run.threads > 0:
            import torch

            torch.set_num_threads(self.config.run.threads)
