"""Device, precision and the torchrun environment.

Under `torchrun --nproc_per_node N` every process trains a DDP replica on its shard of each
global batch; only rank 0 writes files and prints; metrics are summed across ranks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

PRECISIONS = {
    # name: (parameter dtype, compute dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16-mixed": (torch.float32, torch.float16),
}


@dataclass
class Runtime:
    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    loss_chunk_tokens: int = 2048
    compile: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def param_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision][0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision][1]

    def autocast(self):
        """Mixed precision context for forward passes (a no-op for fp32 and pure bf16)."""
        if self.precision in ("bf16-mixed", "fp16-mixed"):
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.distributed:
            tdist.all_reduce(t, op=op or tdist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory_gib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return None


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "fp32"


def setup_runtime(
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    loss_chunk_tokens: int = 2048,
    compile: bool = False,
) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from ..errors import UsageError

            raise UsageError("runtime.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        tdist.init_process_group(backend=be)
    return Runtime(
        device=dev,
        precision=resolve_precision(precision, dev),
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        loss_chunk_tokens=loss_chunk_tokens,
        compile=compile,
    )


def teardown(rt: Runtime) -> None:
    if rt.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
