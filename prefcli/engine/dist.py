"""Device, precision, the torchrun environment and how several processes share a model.

Under `torchrun --nproc_per_node N` every process trains on its shard of each global batch; only
rank 0 prints; metrics are summed across ranks. `runtime.parallel` says how the model is shared:

- ddp:  every process holds the whole model, gradients and optimizer state (DistributedDataParallel);
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters, gradients and optimizer state:
        one unit per decoder layer, one per `PolicyLM` nested in the trained module, and the root.
        Without torchrun it runs as a single-process shard (a process group of one).

`Runtime.wrap` is the one place a trained module gets its strategy (the Group calls it before it
creates the optimizer); algorithms never ask which strategy runs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

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
    parallel: str = "ddp"  # "ddp" | "fsdp"
    reshard_after_forward: bool = True  # fsdp
    cpu_offload: bool = False  # fsdp
    timeout_s: float = 1800.0
    mesh: Any = None  # the DeviceMesh FSDP shards over (fsdp only)
    owns_process_group: bool = False  # created by setup_runtime, so destroyed by teardown

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module the loop calls for a trained `module`: FSDP2-sharded in place (fsdp), DDP-wrapped
        (ddp under torchrun) or itself. Parameters are replaced when sharded: build the optimizer after."""
        if self.sharded:
            shard(module, self)
            return module
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return module

    def place_frozen(self, module: nn.Module) -> nn.Module:
        """A module that is never trained (the RL reference): sharded like the trained one under fsdp (each
        process holds 1/N of it, gathered layer by layer in its forward), a whole copy per process under ddp."""
        if self.sharded:
            shard(module, self)
            # FSDP2 keeps its root's weights whole after forward for the backward that follows (and every
            # unit's with reshard_after_forward: false); a frozen module has no backward: every unit frees
            # its weights after its forward
            module.set_reshard_after_forward(True)
        return module

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


def resolve_device(name: str, what: str = "runtime.device", index: int | None = None) -> torch.device:
    """'auto' (the GPU when one is visible, else the CPU), 'cuda' (device `index`, when given) or another
    torch device name; 'cuda' without a GPU is a UsageError naming `what`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            from ..errors import UsageError

            raise UsageError(f"{what} is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.device(name)


def setup_runtime(
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    loss_chunk_tokens: int = 2048,
    compile: bool = False,
    parallel: str = "ddp",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    timeout_s: float = 1800.0,
) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, index=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if cpu_offload and dev.type != "cuda":
        from ..errors import UsageError

        raise UsageError(
            "runtime.fsdp.cpu_offload moves the sharded state from GPU memory to CPU memory; on a CPU device "
            "there is nothing to offload. Remove it, or run on a GPU (runtime.device: cuda)."
        )
    owns = False
    if (world > 1 or parallel == "fsdp") and not tdist.is_initialized():
        be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        if world > 1:
            tdist.init_process_group(backend=be, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
        else:  # fsdp without torchrun: a process group of one, in memory (no port, no rendezvous)
            tdist.init_process_group(backend=be, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    mesh = None
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world,))
    return Runtime(
        device=dev,
        precision=resolve_precision(precision, dev),
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        loss_chunk_tokens=loss_chunk_tokens,
        compile=compile,
        parallel=parallel,
        reshard_after_forward=reshard_after_forward,
        cpu_offload=cpu_offload,
        timeout_s=timeout_s,
        mesh=mesh,
        owns_process_group=owns,
    )


def teardown(rt: Runtime) -> None:
    """Destroy the process group this runtime created (one made by the caller stays theirs)."""
    if rt.owns_process_group and tdist.is_initialized():
        tdist.destroy_process_group()


# ------------------------------------------------------------------------------ FSDP2


def _layer_classes(root: nn.Module) -> set[str]:
    """Class names of the decoder layers: transformers lists them in `_no_split_modules` (the blocks that
    must stay whole on one device), which is exactly the FSDP unit torchtitan and accelerate use."""
    names: set[str] = set()
    for m in root.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard(root: nn.Module, rt: Runtime) -> None:
    """FSDP2 on `root`, innermost units first: every decoder layer, every module that marks itself
    `fsdp_unit = True` (a PolicyLM inside a larger module, whose forward other code also calls), then the
    root, which holds what is left (embeddings, final norm, output head, value heads ...). Mixed precision
    (bf16 parameters in forward/backward, fp32 gradient reduction) on GPU with bf16-mixed."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if rt.device.type == "cuda" and rt.precision == "bf16-mixed":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = dict(
        mesh=rt.mesh,
        mp_policy=mp,
        offload_policy=CPUOffloadPolicy() if rt.cpu_offload else OffloadPolicy(),
    )
    layers = _layer_classes(root)
    for m in list(root.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, reshard_after_forward=rt.reshard_after_forward, **kw)
    for m in list(root.modules()):
        if m is not root and getattr(m, "fsdp_unit", False):
            fully_shard(m, reshard_after_forward=rt.reshard_after_forward, **kw)
    fully_shard(root, **kw)
    # FSDP2 takes as its root the first unit that runs forward. A sampler may run a decoder layer (HF
    # generate) or code may call a nested PolicyLM before the root ever runs; fix the root now, as its
    # first forward would (the initialisation is idempotent).
    root._get_fsdp_state()._lazy_init()


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(module: nn.Module) -> None:
    """Every FSDP unit of `module` back to its shards. A forward without backward (evaluation, scoring a
    rollout) leaves the root's weights whole (FSDP2 keeps them for the backward it expects); code that reads
    the parameters (checkpoints, memory accounting) must see the shards the optimizer holds."""
    for u in fsdp_units(module):
        u.reshard()


@contextlib.contextmanager
def gathered(root: nn.Module, rt: Runtime, modules: Iterable[nn.Module] | None = None, hold: bool = False):
    """Inside, the FSDP units holding the parameters of `modules` (default: every unit of `root`) hold them
    whole, as plain tensors, on every process: for code that reads weights directly (the fast sampler
    copying them into its shadows). `hold`: keep them whole through forwards too (HF generate calls layer
    forwards, which would otherwise free their weights after every token). A no-op unless sharded.
    Memory: the gathered parameters in their forward dtype for the duration (docs/scaling.md)."""
    units = fsdp_units(root)
    if not units:
        yield
        return
    if modules is not None:
        owner: dict[int, nn.Module] = {}
        for u in units:  # inner units come later in modules(): the innermost owner wins
            for p in u.parameters():
                owner[id(p)] = u
        want = {id(owner[id(p)]): owner[id(p)] for m in modules for p in m.parameters() if id(p) in owner}
        units = [u for u in units if id(u) in want]
    for u in units:
        u.unshard()
    if hold:
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for u in units:
            if hold:
                # back to what shard() set: FSDP2 never reshards its root after forward (backward follows)
                u.set_reshard_after_forward(u is not root and rt.reshard_after_forward, recurse=False)
            u.reshard()


# ------------------------------------------------------------------------------ memory


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds of `t` (its own shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def is_comm_failure(e: BaseException) -> bool:
    """A collective that failed because another process died, stalled past runtime.timeout_s or lost its
    network: torch raises DistError subclasses, and gloo plain RuntimeErrors naming the transport."""
    if isinstance(e, getattr(tdist, "DistError", ())):
        return True
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException):  # a sharded checkpoint save/load: one of the ranks' failures
        return any(is_comm_failure(exc) for exc, _trace in e.failures.values())
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text for k in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    )
