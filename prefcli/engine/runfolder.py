"""The run folder's lifecycle, independent of what a checkpoint holds.

Rules that make a run impossible to lose (docs/cli.md, "What a failure leaves behind"):

- A checkpoint folder is written as `checkpoints/.tmp-step-N/` (`begin_checkpoint`), then completed by
  `commit_checkpoint`: a marker, `complete.json`, listing every file of the folder with its size, is the
  LAST file written (after every file is flushed to disk), and the folder is renamed to `step-N/`. A
  folder without the marker is not a checkpoint, whatever else it holds.
- Removing a checkpoint (pruning, or replacing one of the same step) removes the marker FIRST, so a
  removal cut off half-way leaves a folder that is skipped, never one that looks complete.
- `verify_checkpoint` checks a checkpoint before it is resumed: the marker, each listed file and its
  size, state.json, and the header of every safetensors file against the file's length.
  `resumable_checkpoint` returns the newest checkpoint that passes, with the newer ones it skipped and why.
- `final/` is written like a checkpoint: into `.tmp-final/`, then renamed; an old `final/` is replaced
  only once the new one is whole.
- `RunLock`: one run at a time per folder, through `fcntl.flock` on `.prefcli.lock` in the folder. The
  kernel drops the lock when the process dies, so a crashed run never leaves the folder locked.

Before any of that, the checks a run makes of its folder before it loads anything (`check_run_dir`,
`pick_resume`: a folder, writable, not in use, holding no other run unless --resume or --overwrite, and for
--resume a checkpoint that verifies), so that a folder that cannot take the run exits 2 with nothing
written; and, once every check has passed, `take_run_folder`: the lock taken, the checks repeated under
it, what cut-off writes left removed and recipe.yaml written.

The checkpoint *contents* (model and optimizer state, RNG, task state) are written by
engine/checkpoint.py between `begin_checkpoint` and `commit_checkpoint`; nothing here reads them beyond
state.json's format.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from ..errors import UsageError

# What a run folder holds; --overwrite removes exactly these, nothing else.
RUN_ARTIFACTS = (
    "recipe.yaml",
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "final",
    "curves.png",
    "samples.jsonl",
    "best",  # train.keep_best
    "tensorboard",  # log.report_to: [tensorboard]
)
MARKER = "complete.json"
LOCK_FILE = ".prefcli.lock"
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
FINAL = "final"
_TMP_FINAL = ".tmp-final"
_OLD_FINAL = ".old-final"

# errno values that mean "the disk (or a limit on it) refused the write"
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file grew past the file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "an input/output error from the disk",
}
# safetensors (Rust) reports I/O errors in its message rather than as an OSError
_RUST_IO = {
    "No space left": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "File too large": errno.EFBIG,
    "os error 27": errno.EFBIG,
    "Disk quota": errno.EDQUOT,
    "os error 122": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "os error 30": errno.EROFS,
    "Permission denied": errno.EACCES,
    "os error 13": errno.EACCES,
}


# what to do about each, before continuing with --resume: a permission error is not a full disk
DISK_FIXES = {
    errno.ENOSPC: "Free space on the disk",
    errno.EDQUOT: "Free space or raise the quota",
    errno.EFBIG: "Raise the file-size limit (ulimit -f)",
    errno.EROFS: "Make the file system writable (or move the run folder to one that is)",
    errno.EACCES: "Fix the run folder's permissions (it and everything in it must be writable by you)",
    errno.EPERM: "Fix the run folder's permissions or attributes (chattr, ACLs)",
    errno.EIO: "Check the disk (dmesg shows its errors)",
}


def _disk_errno(e: BaseException) -> int | None:
    """The errno of a write the disk refused, in `e` or in the per-rank failures DCP's CheckpointException holds."""
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException: per-rank errors
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException) and (code := _disk_errno(inner)) is not None:
                return code
    code = getattr(e, "errno", None)
    if isinstance(e, OSError) and code in DISK_ERRNOS:
        return code
    text = str(e)
    for needle, code in _RUST_IO.items():
        if needle in text:
            return code
    return None


def disk_error(e: BaseException) -> str | None:
    """A plain description when `e` is the disk refusing a write (full, quota, file-size limit, read-only,
    permissions), else None."""
    code = _disk_errno(e)
    return DISK_ERRNOS[code] if code is not None else None


def disk_fix(e: BaseException, then: str = "then continue with the same command and --resume.") -> str:
    """What to do about the refusal `disk_error` described, and `then`."""
    code = _disk_errno(e)
    fix = DISK_FIXES.get(code, "Fix the cause") if code is not None else "Fix the cause"
    return f"{fix}, {then}"


def unwrap(e: BaseException) -> BaseException:
    """The exception that happened: DCP's CheckpointException only says which ranks failed ("CheckpointException
    ranks:dict_keys([0])"); each rank's own exception is in its `failures`."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return unwrap(inner)
    return e


def error_text(e: BaseException) -> str:
    """'Type: first line of the message' of the exception that happened (see unwrap)."""
    u = unwrap(e)
    first = str(u).strip().splitlines()[0] if str(u).strip() else ""
    return f"{type(u).__name__}: {first}" if first else type(u).__name__


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> dict[str, int]:
    """Flush every file under `root` to disk; returns {relative path: size}."""
    sizes: dict[str, int] = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            sizes[str(p.relative_to(root))] = p.stat().st_size
        _fsync_dir(Path(dirpath))
    return sizes


def _write_marker(folder: Path, info: dict) -> None:
    tmp = folder / (MARKER + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(info))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MARKER)
    _fsync_dir(folder)


# ------------------------------------------------------------------------------ checkpoints


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoints/step-N folder, complete or not, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The checkpoints whose marker is present, oldest first (not verified: see `resumable_checkpoint`)."""
    return [(s, p) for s, p in step_folders(run_dir) if is_complete(p)]


def begin_checkpoint(run_dir: Path, step: int, rank: int, barrier: Callable[[], None]) -> Path:
    """Every rank calls this; returns the temporary folder to write the checkpoint of `step` into."""
    tmp = checkpoints_root(run_dir) / f"{TMP_PREFIX}step-{step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def commit_checkpoint(
    tmp: Path, step: int, rank: int, barrier: Callable[[], None], keep: int, info: dict | None = None
) -> Path:
    """Every rank calls this once it has written its files into `tmp`. Rank 0 flushes them, writes the
    completion marker last, renames the folder to step-N (replacing an older one of that step, marker
    first) and prunes to the newest `keep` checkpoints."""
    dest = tmp.parent / f"step-{step}"
    barrier()
    if rank == 0:
        files = _fsync_tree(tmp)
        _write_marker(tmp, {"step": step, "files": files, **(info or {})})
        if dest.exists():
            remove_checkpoint(dest)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        prune(dest.parent.parent, keep)
    barrier()
    return dest


def abort_checkpoint(tmp: Path, rank: int) -> None:
    """Remove what a failed write left in its temporary folder (rank 0; best effort: the disk may be full)."""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Marker first: from that instant the folder is no longer a checkpoint, however far the removal gets."""
    marker = Path(path) / MARKER
    if marker.exists():
        marker.unlink()
        _fsync_dir(Path(path))
    shutil.rmtree(path, ignore_errors=True)


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove every other step-N folder (older complete ones,
    and incomplete ones: cut-off writes or removals)."""
    complete = complete_checkpoints(run_dir)
    kept = {p for _, p in complete[-keep:]} if keep > 0 else set()
    for _, p in step_folders(run_dir):
        if p not in kept:
            remove_checkpoint(p)


def _check_safetensors(path: Path) -> str | None:
    """The safetensors layout: an 8-byte header length, a JSON header whose data offsets end exactly at the
    end of the file. Catches truncation and garbage without reading the tensors."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is cut off ({size} bytes)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"{path.name} is cut off or not a safetensors file (header of {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{path.name} has a damaged header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"{path.name} does not have the length its header gives (cut off or damaged)"
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete, undamaged checkpoint folder, else what is wrong with it (one line).
    Checks the marker, every file it lists (present, same size), state.json, and each safetensors file's
    header against its length. The tensor values themselves are not checksummed."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER}: the checkpoint was never completed (a cut-off write or removal)"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is damaged"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    if "state.json" in files:
        try:
            json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "state.json is damaged (not valid JSON)"
    for rel in files:
        if rel.endswith(".safetensors"):
            try:
                problem = _check_safetensors(path / rel)
            except OSError as e:
                problem = f"{rel}: {e.strerror or e}"
            if problem:
                return problem
    return None


def checkpoint_info(path: Path) -> dict:
    """The marker's contents (step, files, and what the writer added, e.g. metrics_lines)."""
    try:
        return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def resumable_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes `verify_checkpoint`, and the newer folders skipped with the reason."""
    skipped: list[tuple[Path, str]] = []
    for _, p in reversed(step_folders(run_dir)):
        problem = verify_checkpoint(p)
        if problem is None:
            return p, skipped
        skipped.append((p, problem))
    return None, skipped


def clean_temporaries(run_dir: Path) -> None:
    """Remove what cut-off writes left: checkpoints/.tmp-*, .tmp-final, .old-final (under the run lock)."""
    run_dir = Path(run_dir)
    root = checkpoints_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
    tmp, old, dest = run_dir / _TMP_FINAL, run_dir / _OLD_FINAL, run_dir / FINAL
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():  # a replacement of final/ cut off between its two renames: the old one is still whole
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, dest)


# ----------------------------------------------------------------------------------- final/


def write_final(run_dir: Path, save: Callable[[Path], None], main: bool = True) -> Path:
    """Write the final model through `save(folder)` into a temporary folder, flush it, and rename it to
    final/. A failure (full disk, interrupt) removes the temporary folder and leaves any earlier final/
    as it was. Every process calls `save` (a sharded model is gathered by all of them); only the main one
    (`main`) writes, so only it touches the folders."""
    run_dir = Path(run_dir)
    tmp, dest, old = run_dir / _TMP_FINAL, run_dir / FINAL, run_dir / _OLD_FINAL
    if not main:
        save(tmp)
        return dest
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        save(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------- lock


class RunFolderBusy(Exception):
    """Another live process holds the run folder's lock."""

    def __init__(self, run_dir: Path, holder: str):
        self.holder = holder
        super().__init__(f"{run_dir} is in use by another prefcli run ({holder})")


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text else "a process that is starting"


class RunLock:
    """An exclusive lock on a run folder for the life of a run: `fcntl.flock` on `.prefcli.lock`. The kernel
    releases it when the process exits, however it exits (kill -9 included), so it never goes stale. The
    file itself stays (removing a lock file while others may open it is racy) and holds the holder's pid."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    @staticmethod
    def probe(run_dir: Path) -> str | None:
        """Who holds the lock of `run_dir` now (None if nobody), without creating or changing anything."""
        import fcntl

        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        finally:
            os.close(fd)  # closing drops the probe's shared lock
        return None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunFolderBusy(self.path.parent, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------- before a run


def default_run_dir(command: str, recipe_path: Path) -> Path:
    """Where `prefcli <command> RECIPE` writes when neither --output-dir nor output.dir says."""
    return Path.cwd() / "runs" / f"{command}-{Path(recipe_path).stem}"


def describe_run_dir(run_dir: Path) -> str | None:
    present = [a for a in RUN_ARTIFACTS if (run_dir / a).exists()]
    return ", ".join(present) if present else None


def _in_use(run_dir: Path, holder: str) -> UsageError:
    return UsageError(
        f"output dir {run_dir} is in use by another prefcli run ({holder}); wait for it to end, "
        "or use --output-dir for a new folder"
    )


def _unwritable(run_dir: Path) -> str | None:
    """Why the run folder could not be written (checked before anything is loaded), else None."""
    p = run_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    if p == run_dir:
        for name in ("checkpoints", "metrics.jsonl", "recipe.yaml", "final"):
            q = run_dir / name
            if q.exists() and not os.access(q, os.W_OK | (os.X_OK if q.is_dir() else 0)):
                return f"{q} is not writable"
    return None


def _recorded_command(run_dir: Path) -> str | None:
    """The command of the run in `run_dir`, from its recipe.yaml."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data.get("command") if isinstance(data, dict) else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, command: str | None = None) -> None:
    """Everything about the run folder that can be known before loading data and models (exit 2)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output dir {run_dir} exists and is not a folder; give a folder with --output-dir")
    why = _unwritable(run_dir)
    if why:
        raise UsageError(f"output dir {run_dir}: {why}; fix its permissions or choose another --output-dir")
    holder = RunLock.probe(run_dir) if run_dir.is_dir() else None
    if holder:
        raise _in_use(run_dir, holder)
    if resume:
        recorded = _recorded_command(run_dir)
        if command is not None and recorded is not None and recorded != command:
            raise UsageError(
                f"--resume: {run_dir} holds a `prefcli {recorded}` run (its recipe.yaml), not a `prefcli {command}` "
                f"run; continue it with `prefcli {recorded} --resume`, or use --output-dir for a new folder"
            )
        pick_resume(run_dir)
        return
    held = describe_run_dir(run_dir) if run_dir.is_dir() else None
    if held and not overwrite:
        raise UsageError(
            f"output dir {run_dir} holds another run ({held}). Use --resume to continue it, "
            "--overwrite to replace it, or --output-dir for a new folder."
        )


def earlier_layout(path: Path) -> str | None:
    """Why `path` cannot be resumed when it is a checkpoint of prefcli before 0.2.0 (one
    model-<group>.safetensors per module, no format field), else None."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or "format" in state or not list(Path(path).glob("model-*.safetensors")):
        return None
    return (
        f"--resume: {path} was written by an earlier prefcli (one model-<group>.safetensors per module); "
        "this version reads sharded checkpoints (model-<group>/ folders) only. Continue that run with the "
        "prefcli version that wrote it, or start a new run."
    )


def pick_resume(run_dir: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones skipped (with why); UsageError if none."""
    path, skipped = resumable_checkpoint(run_dir)
    if path is None:
        for p, _ in skipped:  # before 0.2.0 a checkpoint had no completion marker: say so, not "incomplete"
            if earlier_layout(p):
                raise UsageError(earlier_layout(p))
        if skipped:
            why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
            raise UsageError(
                f"--resume: no complete checkpoint in {run_dir}/checkpoints ({why}); start again with --overwrite"
            )
        raise UsageError(
            f"--resume: no checkpoint in {run_dir}/checkpoints (set train.save_every_steps to write them); "
            "start again with --overwrite"
        )
    return path, skipped


# ------------------------------------------------------------------------- taking the folder


def clear_artifacts(run_dir: Path, names: tuple[str, ...]) -> None:
    """--overwrite: remove exactly these files/folders of a previous run, nothing else."""
    for a in names:
        p = run_dir / a
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def replace_text(path: Path, text: str) -> None:
    """Write a file whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


def prepare_run_dir(run_dir: Path, overwrite: bool, resume_from: Path | None) -> None:
    """Under the run lock: clear a replaced run, or cut metrics.jsonl back to the resumed checkpoint."""
    if overwrite:
        clear_artifacts(run_dir, RUN_ARTIFACTS)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if resume_from is not None and metrics.exists():  # drop what was logged after the checkpoint
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
        n = checkpoint_info(resume_from).get("metrics_lines")
        if isinstance(n, int):
            keep = lines[:n]
        else:  # a checkpoint that did not record it: by step
            step = int(resume_from.name.split("-")[1])
            keep = [x for x in lines if _step_of(x) is not None and _step_of(x) <= step]
        replace_text(metrics, "".join(x + "\n" for x in keep))


def take_run_folder(
    run_dir: Path, lock: RunLock, recipe_yaml: str, resume_from: Path | None, resume: bool, overwrite: bool
) -> None:
    """Every check has passed: lock the run folder, check it again under the lock (another run may have
    written it meanwhile), remove what cut-off writes left, and write recipe.yaml. Rank 0 only."""
    try:
        lock.acquire()
    except RunFolderBusy as e:
        raise _in_use(run_dir, e.holder) from None
    except OSError as e:
        raise UsageError(
            f"output dir {run_dir}: cannot create it ({e.strerror or e}); choose another --output-dir"
        ) from None
    held = describe_run_dir(run_dir)
    if held and not resume and not overwrite:
        raise UsageError(
            f"output dir {run_dir} now holds another run ({held}), written while this one was starting; "
            "use --output-dir for a new folder"
        )
    if resume_from is not None and verify_checkpoint(resume_from) is not None:
        raise UsageError(f"--resume: {resume_from} changed while this run was starting; run the command again")
    clean_temporaries(run_dir)
    prepare_run_dir(run_dir, overwrite, resume_from)
    replace_text(run_dir / "recipe.yaml", recipe_yaml)
