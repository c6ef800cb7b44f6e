"""The planner's view of this host: world size, device kind and real memory capacities.

Kept apart because TorchRec's topology API moves between versions (`TopologyFactory`
appeared in 1.8; the GPU hosts run 1.6): version differences stay in this file.
"""

from __future__ import annotations

import os

import torch
from torchrec.distributed.planner.types import Topology


def host_memory_bytes() -> int:
    """Physical memory of this host."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 * 1024**3


def create_topology(world_size: int, local_world_size: int, device: torch.device) -> Topology:
    """Topology with this host's memory split between its local workers."""
    compute_device = device.type
    ddr_per_rank = host_memory_bytes() // max(1, local_world_size)
    hbm_per_rank = None
    if compute_device == "cuda":
        hbm_per_rank = torch.cuda.get_device_properties(device).total_memory
    try:
        from torchrec.distributed.planner.types import (
            HardwareConfig,
            KernelConfig,
            TopologyFactory,
            TrainerConfig,
        )
    except ImportError:  # torchrec < 1.8
        kwargs = {"ddr_cap": ddr_per_rank}
        if hbm_per_rank is not None:
            kwargs["hbm_cap"] = hbm_per_rank
        return Topology(world_size=world_size, local_world_size=local_world_size,
                        compute_device=compute_device, **kwargs)
    trainer = TrainerConfig(world_size=world_size, local_world_size=local_world_size,
                            ddr_cap_bytes=ddr_per_rank,
                            hbm_cap_bytes=hbm_per_rank if hbm_per_rank is not None else 0)
    return TopologyFactory.create_topology(trainer_config=trainer,
                                           hardware_config=HardwareConfig(),
                                           kernel_config=KernelConfig(
                                               compute_device=compute_device))
