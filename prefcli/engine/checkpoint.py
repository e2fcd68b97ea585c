"""Atomic, exactly resumable checkpoints in safetensors + JSON (nothing is pickled), sharded.

checkpoints/step-N/
  state.json                 step, task state (data position, ...), optimizer hyper-parameters,
                             each group's update count (its LR schedule's clock), python RNG,
                             world size, runtime.parallel, prefcli version, checkpoint format
  model-<group>/             trainable parameters of each trained module (LoRA: the adapters)
  optim-<group>/             its AdamW state (exp_avg, exp_avg_sq, step), keyed by parameter name
  rng-rank<r>.safetensors    torch CPU/CUDA generator states of every rank
  extra-rank<r>.safetensors  task tensors of every rank (precomputed reference log-probs, a rollout buffer)

model-<group>/ and optim-<group>/ are written by torch.distributed.checkpoint (DCP) with its Hugging
Face storage writer: every process writes the part of each tensor it holds (its FSDP shard; under DDP,
where every process holds everything, DCP spreads the tensors over the processes and each is written
once) to its own safetensors file, whose header records where that part sits in the whole tensor.
Nothing is gathered on one process. Loading reads, on every process, exactly the slices it now holds,
so a checkpoint resumes under another number of processes and under the other runtime.parallel (ddp
<-> fsdp: the files are the same).

  complete.json              written last: every file above with its size (engine/runfolder.py)

The folder's lifecycle (temporary folder, completion marker, rename, pruning, verification before a
resume) is engine/runfolder.py's; this module only writes and reads what is inside.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from . import runfolder
from .dist import reshard

FORMAT = "prefcli-sharded-1"  # state.json "format": model/optimizer state in per-process safetensors (DCP)


# ------------------------------------------------------------------ model and optimizer state (DCP)


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (each once), as they are held: DTensor shards under FSDP. Detached
    views of the parameters themselves, so loading into them loads in place."""
    reshard(module)
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

    return dcp, HuggingFaceStorageReader, HuggingFaceStorageWriter


def _no_dist() -> bool:
    """One process without a process group."""
    return not torch.distributed.is_initialized()


def _dcp_call(fn, *args, **kw):
    """A DCP save/load; in one process without a process group DCP warns on every call that it assumes one
    process, which it correctly does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return fn(*args, **kw)


def save_model_state(folder: Path, groups: dict) -> dict:
    """Every rank calls this: the trainable parameters and the optimizer state of each group into
    `folder`/model-<group>/ and optim-<group>/, each rank writing what it holds. Returns what state.json
    keeps of the optimizers (their hyper-parameters)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp, _, Writer = _dcp()
    meta = {}
    for name, g in groups.items():
        w = Writer(str(folder / f"model-{name}"), save_distributed=True)
        _dcp_call(dcp.save, _trainable(g.raw), storage_writer=w, no_dist=_no_dist())
        osd = get_optimizer_state_dict(g.raw, g.optimizer)
        w = Writer(str(folder / f"optim-{name}"), save_distributed=True)
        _dcp_call(dcp.save, {"state": osd["state"]}, storage_writer=w, no_dist=_no_dist())
        meta[name] = {"param_groups": osd["param_groups"]}
    return meta


def load_model_state(folder: Path, groups: dict, meta: dict) -> None:
    """Every rank calls this: parameters and optimizer state of each group, in place, each rank reading the
    slices it holds now (whatever the number of processes or the strategy that wrote them)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    dcp, Reader, _ = _dcp()
    for name, g in groups.items():
        _dcp_call(dcp.load, _trainable(g.raw), storage_reader=Reader(str(folder / f"model-{name}")), no_dist=_no_dist())
        osd = get_optimizer_state_dict(g.raw, g.optimizer)  # a fresh optimizer's state is initialised first
        _dcp_call(
            dcp.load, {"state": osd["state"]}, storage_reader=Reader(str(folder / f"optim-{name}")), no_dist=_no_dist()
        )
        groups_meta = meta[name]["param_groups"]
        for pg in groups_meta:
            if "betas" in pg:
                pg["betas"] = tuple(pg["betas"])
        set_optimizer_state_dict(g.raw, g.optimizer, {"state": osd["state"], "param_groups": groups_meta})


def tensor_names(folder: Path) -> set[str]:
    """Names of the tensors stored in a model-<group>/ or optim-<group>/ folder (from the file headers)."""
    names: set[str] = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names.update(h.keys())
    return names


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A model-<group>/ or optim-<group>/ folder as whole tensors, in this process, without a process group
    (for inspection and tests)."""
    dcp, Reader, _ = _dcp()
    reader = Reader(str(folder))
    md = reader.read_metadata()
    out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    _dcp_call(dcp.load, out, storage_reader=Reader(str(folder)), no_dist=True)
    return out


# -------------------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], list]:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"torch_cuda_{i}"] = s
    st = random.getstate()
    return t, [st[0], list(st[1]), st[2]]


def set_rng_state(tensors: dict[str, torch.Tensor], py_state) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    if py_state is not None:
        random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


# ------------------------------------------------------------------------------ saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    groups: dict,
    task_state: dict,
    extra: dict[str, torch.Tensor],
    rank: int,
    world: int,
    keep: int,
    barrier,
    parallel: str = "ddp",
    info: dict | None = None,
) -> Path:
    """Every rank calls this. Every rank writes its part of the model/optimizer state, its RNG and its
    task tensors; rank 0 writes state.json. `info` goes into the completion marker (run-folder bookkeeping
    such as the metrics line count)."""
    tmp = runfolder.begin_checkpoint(run_dir, step, rank, barrier)
    try:
        write_state(tmp, step, groups, task_state, extra, rank, world, parallel)
        return runfolder.commit_checkpoint(tmp, step, rank, barrier, keep, info)
    except BaseException:
        runfolder.abort_checkpoint(tmp, rank)
        raise


def write_state(
    tmp: Path,
    step: int,
    groups: dict,
    task_state: dict,
    extra: dict[str, torch.Tensor],
    rank: int,
    world: int,
    parallel: str = "ddp",
) -> None:
    """What a checkpoint holds, written into its (temporary) folder by every rank."""
    rng_t, py_state = rng_state()
    save_file(rng_t, str(tmp / f"rng-rank{rank}.safetensors"))
    if extra:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / f"extra-rank{rank}.safetensors")
        )
    optim_meta = save_model_state(tmp, groups)
    if rank == 0:
        state = {
            "format": FORMAT,
            "step": step,
            "task": task_state,
            "optim": optim_meta,
            "updates": {name: g.updates for name, g in groups.items()},
            "python_rng": py_state,
            "world_size": world,
            "parallel": parallel,
            "prefcli_version": __version__,
            "time": time.time(),
        }
        (tmp / "state.json").write_text(json.dumps(state))


def load_checkpoint(
    path: Path, groups: dict, rank: int, world: int | None = None
) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """Restore modules and optimizers in place; returns (step, task state, extra tensors). Call
    `restore_rng` last, after everything else that consumes random numbers has been built. The task
    tensors are this rank's when the number of processes is unchanged, else rank 0's."""
    state = json.loads((path / "state.json").read_text())
    load_model_state(path, groups, state["optim"])
    for name, g in groups.items():
        g.updates = int(state["updates"][name])  # each group's own update count drives its LR schedule
    same_world = world is None or int(state.get("world_size", 1)) == world
    f = path / f"extra-rank{rank if same_world else 0}.safetensors"
    extra = load_file(str(f)) if f.exists() else {}
    return int(state["step"]), state["task"], extra


def restore_rng(path: Path, rank: int) -> None:
    state = json.loads((path / "state.json").read_text())
    f = path / f"rng-rank{rank}.safetensors"
    if f.exists():
        set_rng_state(load_file(str(f)), state.get("python_rng"))


# ---------------------------------------------------------------------- before resuming


def _find(d, key: str):
    """The first value of `key` in a nested dict (the data cursor's global batch inside a task state)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def check_resume(path: Path, groups: dict, task_state: dict, world: int) -> None:
    """Refuse (UsageError, exit 2, before anything is written) a checkpoint this run cannot continue: an
    older format, other trained modules or parameters, or a different number of processes that changes
    the global batch (the data position would no longer mean the same examples)."""
    from ..errors import UsageError

    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise UsageError(
            runfolder.earlier_layout(path) or f"--resume: {path} has an unknown format {state.get('format')!r}"
        )
    if set(state["updates"]) != set(groups):
        raise UsageError(
            f"--resume: {path} holds the modules {sorted(state['updates'])}, this run trains {sorted(groups)}"
        )
    for name, g in groups.items():
        want = set(_trainable(g.raw))
        have = tensor_names(path / f"model-{name}")
        if want != have:
            missing, unexpected = sorted(want - have)[:3], sorted(have - want)[:3]
            raise UsageError(
                f"--resume: {path} does not match the model '{name}' (missing {missing}, unexpected {unexpected}); "
                "the recipe's model or LoRA settings changed since the checkpoint. Resume with the recipe the run was "
                "started with (the run folder's recipe.yaml), or start a new run (--overwrite, or another --output-dir)"
            )
    old_batch, new_batch = _find(state["task"], "global_batch"), _find(task_state, "global_batch")
    problem = world_change_problem(int(state.get("world_size", 1)), old_batch, world, new_batch)
    if problem:
        raise UsageError(f"--resume: {path} {problem}")


def world_change_problem(old_world: int, old_batch: int | None, world: int, new_batch: int | None) -> str | None:
    """Why a checkpoint written by `old_world` processes with `old_batch` examples per step cannot continue on
    `world` processes whose steps take `new_batch`, with what to change; None when it can."""
    if old_world == world or old_batch is None or new_batch is None or old_batch == new_batch:
        return None
    if old_batch % world == 0:
        per = old_batch // world
        fix = (
            f"To keep {old_batch} per step, set train.batch_size x train.grad_accum_steps to {per} (rlhf and gan: "
            f"rlhf.prompts_per_rollout to {per})"
        )
    else:
        fix = f"{old_batch} does not split evenly over {world} processes: resume on a number of processes that divides {old_batch}"
    return (
        f"was written by {old_world} process(es) whose steps took {old_batch} examples (the global batch); with "
        f"{world} process(es) this recipe's steps take {new_batch}, so the saved data position would point at "
        f"other examples. {fix}."
    )
