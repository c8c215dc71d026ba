"""What every engine does the same way over the job's world: sums and a broadcast.

Both engines join one torch.distributed world (megatron's groups or DeepSpeed's sit inside it), so these
calls need nothing engine-specific; an engine mixes this in beside its own `is_main`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class WorldCollectives:
    is_main: bool

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` in place over every rank of the job."""
        dist.all_reduce(tensor)

    def broadcast_from_main(self, value: Any) -> Any:
        """The main rank's `value` on every rank (a small picklable object)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
