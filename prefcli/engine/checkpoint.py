"""Atomic, exactly resumable checkpoints in safetensors + JSON (nothing is pickled).

checkpoints/step-N/
  state.json                 step, task state (data position, ...), optimizer hyper-parameters,
                             each group's update count (its LR schedule's clock),
                             python RNG, prefcli version
  model-<group>.safetensors  trainable parameters of each trained module (LoRA: the adapters)
  optim-<group>.safetensors  optimizer state tensors (exp_avg, exp_avg_sq, step)
  rng-rank<r>.safetensors    torch CPU/CUDA generator states of every rank
  extra.safetensors          task tensors (e.g. precomputed reference log-probs)

  complete.json              written last: every file above with its size (engine/runfolder.py)

The folder's lifecycle (temporary folder, completion marker, rename, pruning, verification before a
resume) is engine/runfolder.py's; this module only writes and reads what is inside.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from . import runfolder


def _optim_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    for pid, d in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise RuntimeError(
            f"checkpoint {where} does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}"
        )
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


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


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (their marker written), oldest first."""
    return runfolder.complete_checkpoints(run_dir)


def latest_checkpoint(run_dir: Path) -> Path | None:
    cps = list_checkpoints(run_dir)
    return cps[-1][1] if cps else None


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
    info: dict | None = None,
) -> Path:
    """Every rank calls this. Rank 0 writes model/optimizer/state; each rank writes its RNG. `info` goes
    into the completion marker (run-folder bookkeeping such as the metrics line count)."""
    tmp = runfolder.begin_checkpoint(run_dir, step, rank, barrier)
    try:
        write_state(tmp, step, groups, task_state, extra, rank, world)
        return runfolder.commit_checkpoint(tmp, step, rank, barrier, keep, info)
    except BaseException:
        runfolder.abort_checkpoint(tmp, rank)
        raise


def write_state(
    tmp: Path, step: int, groups: dict, task_state: dict, extra: dict[str, torch.Tensor], rank: int, world: int
) -> None:
    """What a checkpoint holds, written into its (temporary) folder."""
    rng_t, py_state = rng_state()
    save_file(rng_t, str(tmp / f"rng-rank{rank}.safetensors"))
    if rank == 0:
        optim_meta = {}
        for name, g in groups.items():
            save_file(trainable_state(g.raw), str(tmp / f"model-{name}.safetensors"))
            t, meta = _optim_to_flat(g.optimizer)
            save_file(t, str(tmp / f"optim-{name}.safetensors"))
            optim_meta[name] = meta
        if extra:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
        state = {
            "step": step,
            "task": task_state,
            "optim": optim_meta,
            "updates": {name: g.updates for name, g in groups.items()},
            "python_rng": py_state,
            "world_size": world,
            "prefcli_version": __version__,
            "time": time.time(),
        }
        (tmp / "state.json").write_text(json.dumps(state))


def load_checkpoint(path: Path, groups: dict, rank: int) -> tuple[int, dict, dict[str, torch.Tensor]]:
    """Restore modules and optimizers in place; returns (step, task state, extra tensors). Call
    `restore_rng` last, after everything else that consumes random numbers has been built."""
    state = json.loads((path / "state.json").read_text())
    for name, g in groups.items():
        load_trainable_state(g.raw, load_file(str(path / f"model-{name}.safetensors")), str(path))
        _optim_from_flat(g.optimizer, load_file(str(path / f"optim-{name}.safetensors")), state["optim"][name])
        # each group's own update count drives its LR schedule (older checkpoints: the loop's step)
        g.updates = int(state.get("updates", {}).get(name, state["step"]))
    extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").exists() else {}
    return int(state["step"]), state["task"], extra


def restore_rng(path: Path, rank: int) -> None:
    state = json.loads((path / "state.json").read_text())
    f = path / f"rng-rank{rank}.safetensors"
    if f.exists():
        set_rng_state(load_file(str(f)), state.get("python_rng"))
