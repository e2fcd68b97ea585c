"""Side-by-side benchmarks: TRL 1.x and prefcli on the same workload, in one run.

The workload is docs/performance.md's: a Qwen2-0.5B-shaped causal LM (random weights: the same compute
as real ones) on synthetic word data, one token per word, so both tools see identical token
counts. prefcli is measured through its real entry point (`python -m prefcli <command> recipe`),
reading its own metrics.jsonl; TRL through its trainers with a timing callback. Each run is a
separate process (clean memory statistics).

    python bench/bench.py all --size tiny            # CPU: the tiny workload, every mode
    python bench/bench.py all --size 0.5b            # GPU: the anchor workload
    python bench/bench.py run --impl prefcli --mode sft --size 0.5b --batch 32
    python bench/bench.py sampler --size 0.5b        # the rollout sampler alone (+ a check against HF)
    python bench/bench.py startup                    # whole-process start-up: --help and validate
    python bench/bench.py parallel --size tiny --nproc 2   # prefcli under torchrun: ddp against fsdp

Results: one JSON object per measurement appended to --out (bench/results/*.jsonl), with the
date, git commit and machine; a table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}
# docs/performance.md: SFT/DPO 8 x (128 + 384); RL 1 prompt x 8 samples, 128 + 256 new tokens.
# CPU: batch 8 x (32 + 96).
SHAPES = {"0.5b": dict(prompt=128, completion=384, gen=256), "tiny": dict(prompt=32, completion=96, gen=32)}


def machine() -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------- workload


def make_tokenizer(out: Path, n_words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for i in range(n_words):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(out)
    return fast


def words(rng, n, n_words):
    return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))


def write_data(out: Path, mode: str, rows: int, prompt: int, completion: int, n_words: int) -> Path:
    rng = random.Random(0)
    path = out / f"{mode}.jsonl"
    with open(path, "w") as f:
        for _ in range(rows):
            if mode == "sft":
                r = {"prompt": words(rng, prompt, n_words), "completion": words(rng, completion - 1, n_words)}
            elif mode == "dpo":
                r = {
                    "prompt": words(rng, prompt, n_words),
                    "chosen": words(rng, completion - 1, n_words),
                    "rejected": words(rng, completion - 1, n_words),
                }
            else:
                r = {"prompt": words(rng, prompt, n_words)}
            f.write(json.dumps(r) + "\n")
    return path


def reward_len(completions, **kw):
    return [float(len(c)) / 1000.0 for c in completions]


# ------------------------------------------------------------------------- prefcli


def run_prefcli(a, work: Path) -> dict:
    import yaml

    shape = SHAPES[a.size]
    n_words = min(SIZES[a.size]["vocab_size"] - 8, 30000)
    make_tokenizer(work / "tok", n_words)
    steps = a.steps + a.warmup
    cfg = dict(SIZES[a.size])
    cuda = _cuda()
    recipe: dict = {
        "model": {"init": {"architecture": "qwen2", "config": cfg}, "tokenizer": str(work / "tok")},
        "train": {
            "max_steps": steps,
            "batch_size": a.batch,
            "lr": 1e-5,
            "lr_schedule": "constant",
            "max_grad_norm": 1.0,
            "gradient_checkpointing": a.grad_ckpt,
        },
        "runtime": {"precision": a.precision if cuda else "fp32", "compile": a.compile, "parallel": a.parallel},
        "output": {"save_final": False, "plot": False},
        "log": {"every_steps": 1},
    }
    rows_per_step = a.batch * a.nproc
    if a.mode == "sft":
        data = write_data(work, "sft", rows_per_step * (steps + 2), shape["prompt"], shape["completion"], n_words)
        recipe.update(
            command="sft",
            data={
                "train": {"path": str(data)},
                "max_length": shape["prompt"] + shape["completion"] + 1,
                "shuffle": False,
            },
        )
        cmd = "sft"
    elif a.mode == "dpo":
        data = write_data(work, "dpo", rows_per_step * (steps + 2), shape["prompt"], shape["completion"], n_words)
        recipe.update(
            command="contrastive",
            data={"train": {"path": str(data)}, "max_length": shape["prompt"] + shape["completion"] + 1},
            contrastive={"objective": "dpo"},
        )
        cmd = "contrastive"
    else:
        data = write_data(work, "grpo", a.prompts * a.nproc * (steps + 2), shape["prompt"], 0, n_words)
        (work / "rw.py").write_text(
            "def reward(prompts, completions):\n    return [len(c) / 1000.0 for c in completions]\n"
        )
        recipe.update(
            command="rlhf",
            data={"train": {"path": str(data)}, "max_prompt_length": shape["prompt"], "shuffle": False},
            rewards=[{"kind": "function", "function": str(work / "rw.py") + ":reward"}],
            generation={
                "max_new_tokens": shape["gen"],
                "min_new_tokens": shape["gen"],
                "temperature": 1.0,
                "cuda_graphs": not a.no_graphs,
            },
            rlhf={
                "algorithm": "grpo",
                "num_generations": 8,
                "prompts_per_rollout": a.prompts,
                "kl_coef": a.kl,
                "num_examples": 0,
            },
        )
        recipe["train"]["batch_size"] = a.batch
        cmd = "rlhf"
    rp = work / "recipe.yaml"
    rp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / "run"
    t0 = time.perf_counter()
    launch = [sys.executable]
    if a.nproc > 1:  # torchrun, one process per device (CPU: per core)
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc), "--master_port", str(free_port())]
    res = subprocess.run(
        [*launch, "-m", "prefcli", cmd, str(rp), "-o", str(out), "-q"],
        capture_output=True,
        text=True,
        cwd=work,
        env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "perf/step_s" in r and r["step"] > a.warmup]
    step_s = statistics.median(r["perf/step_s"] for r in rows)
    toks = statistics.median(r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r)
    out_d = {
        "step_s": round(step_s, 4),
        "trained_tokens_per_s": round(toks, 1),
        "wall_s": round(wall, 2),
        "peak_mem_gib": max((r.get("perf/mem_gib", 0) for r in rows), default=None) or None,
        "steps": len(rows),
    }
    if a.mode == "grpo":
        out_d["gen_tokens_per_s"] = round(statistics.median(r["perf/gen_tokens_per_s"] for r in rows), 1)
        out_d["rollout_s"] = round(statistics.median(r["perf/rollout_s"] for r in rows), 4)
    if cuda and rows and "perf/mfu" in rows[0]:
        out_d["mfu"] = round(statistics.median(r["perf/mfu"] for r in rows), 4)
    summary = json.loads((out / "summary.json").read_text())
    out_d["rank_bytes"] = summary.get("memory")  # per group and rank: parameters, gradients, optimizer state
    return out_d


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- TRL


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_trl(a, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback

    cuda = torch.cuda.is_available()
    shape = SHAPES[a.size]
    n_words = min(SIZES[a.size]["vocab_size"] - 8, 30000)
    tok = make_tokenizer(work / "tok", n_words)
    cfg = Qwen2Config(**SIZES[a.size], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # initialise on the GPU: quick, not timed either way
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    rng = random.Random(0)
    steps = a.steps + a.warmup

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.last = time.perf_counter()
            if state.global_step == a.warmup and cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step > a.warmup:
                self.times.append(time.perf_counter() - self.last)

    timer = Timer()
    common = dict(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=a.batch,
        max_steps=steps,
        learning_rate=1e-5,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    n = a.batch * (steps + 2)
    if a.mode == "sft":
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_list(
            [
                {
                    "prompt": words(rng, shape["prompt"], n_words),
                    "completion": words(rng, shape["completion"] - 1, n_words),
                }
                for _ in range(n)
            ]
        )
        tr = SFTTrainer(
            model=model,
            args=SFTConfig(**common, max_length=shape["prompt"] + shape["completion"] + 4),
            train_dataset=ds,
            processing_class=tok,
            callbacks=[timer],
        )
        tokens = a.batch * (shape["prompt"] + shape["completion"])
    elif a.mode == "dpo":
        import copy

        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_list(
            [
                {
                    "prompt": words(rng, shape["prompt"], n_words),
                    "chosen": words(rng, shape["completion"] - 1, n_words),
                    "rejected": words(rng, shape["completion"] - 1, n_words),
                }
                for _ in range(n)
            ]
        )
        ref = copy.deepcopy(model).eval()
        tr = DPOTrainer(
            model=model,
            ref_model=ref,
            args=DPOConfig(**common, max_length=shape["prompt"] + shape["completion"] + 4),
            train_dataset=ds,
            processing_class=tok,
            callbacks=[timer],
        )
        tokens = 2 * a.batch * (shape["prompt"] + shape["completion"])
    else:
        from trl import GRPOConfig, GRPOTrainer

        ds = Dataset.from_list([{"prompt": words(rng, shape["prompt"], n_words)} for _ in range(n)])
        tr = GRPOTrainer(
            model=model,
            reward_funcs=reward_len,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[timer],
            args=GRPOConfig(**common, num_generations=8, max_completion_length=shape["gen"], temperature=1.0),
        )
        tokens = a.batch * (shape["prompt"] + shape["gen"])
    t0 = time.perf_counter()
    tr.train()
    wall = time.perf_counter() - t0
    step_s = statistics.median(timer.times)
    return {
        "step_s": round(step_s, 4),
        "trained_tokens_per_s": round(tokens / step_s, 1),
        "train_wall_s": round(wall, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "steps": len(timer.times),
    }


# -------------------------------------------------------------------------- sampler


def run_sampler(a) -> dict:
    """The rollout sampler alone at docs/performance.md's 64 x 256 (GPU; 32 x 32 on CPU) and at the RL
    step's batch 8, with CUDA graphs and with/without torch.compile; plus agreement with HF."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT))
    from prefcli.engine.rollout import FastDecoder
    from prefcli.engine.sampling import SamplingConfig

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    cfg = Qwen2Config(**SIZES[a.size], attn_implementation="sdpa")
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(dt).eval()
    V = cfg.vocab_size
    shape = SHAPES[a.size]
    P, N = shape["prompt"], shape["gen"]
    ids = torch.randint(3, V, (a.gen_batch, P), device=dev)
    mask = torch.ones_like(ids)
    out: dict = {"prompt": P, "new_tokens": N}
    # agreement with HF: last-position logits of the prefill, and greedy tokens (bf16 numerics let
    # long greedy runs drift apart on a random model's flat distributions)
    check = FastDecoder(model, batch=8, max_len=P + 16, dtype=dt, use_graph=False)
    with torch.no_grad():
        mine = check.prefill(ids[:8], mask[:8])
        ref_logits = model(input_ids=ids[:8]).logits[:, -1].float()
    out["prefill_logits_max_abs_diff"] = round(float((mine - ref_logits).abs().max()), 4)
    out["prefill_logits_scale"] = round(float(ref_logits.abs().max()), 2)
    g = check.sample(ids[:8], mask[:8], SamplingConfig(max_new_tokens=16, temperature=0, pad_token_id=0))
    ref = model.generate(input_ids=ids[:8], attention_mask=mask[:8], max_new_tokens=16, do_sample=False, pad_token_id=0)
    out["greedy_first_token_match"] = round((g.completion_ids[:, 0] == ref[:, P]).float().mean().item(), 3)
    out["greedy_16_token_match"] = round((g.completion_ids == ref[:, P:]).float().mean().item(), 3)
    del check
    variants = (
        [(a.gen_batch, True, True), (8, True, True), (a.gen_batch, True, False)]
        if cuda
        else [(a.gen_batch, False, False)]
    )
    for B, graphs, comp in variants:
        name = f"b{B}_{'graph' if graphs else 'eager'}{'_compiled' if comp else ''}"
        try:
            t0 = time.perf_counter()
            dec = FastDecoder(model, batch=B, max_len=P + N, dtype=dt, use_graph=graphs, compile=comp)
            scfg = SamplingConfig(
                max_new_tokens=N, min_new_tokens=N, temperature=1.0, pad_token_id=0, stop_token_ids=[1]
            )
            dec.sample(ids[:B], mask[:B], scfg)  # warm-up: compiles, captures the graph
            if cuda:
                torch.cuda.synchronize()
            setup = time.perf_counter() - t0
            reps = 3
            t0 = time.perf_counter()
            for _ in range(reps):
                r = dec.sample(ids[:B], mask[:B], scfg)
            if cuda:
                torch.cuda.synchronize()
            s = (time.perf_counter() - t0) / reps
            out[name] = {
                "gen_s": round(s, 4),
                "new_tokens_per_s": round(B * N / s, 1),
                "ms_per_token_step": round(1000 * s / N, 3),
                "setup_s": round(setup, 1),
                "compile_error": dec.compile_error,
                "graph_error": dec.graph_error,
                "all_full_length": bool((r.lengths == N).all()),
            }
            del dec
        except Exception as e:  # record and go on: one variant failing must not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print("PARTIAL " + json.dumps({name: out[name]}), flush=True)
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# -------------------------------------------------------------------------- startup

STARTUP = {
    "help": ["--help"],
    "validate": ["validate", "recipes/tiny/sft.yaml"],
}


def run_startup(a) -> dict:
    """Whole-process start-up of the real entry point (`python -m prefcli ...`): one warm-up run, then the
    median of --repeats runs, for `--help` and for `validate recipes/tiny/sft.yaml` (neither imports torch;
    tests/test_startup.py asserts that, this measures how long it takes)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out: dict = {"repeats": a.repeats}
    for name, args in STARTUP.items():
        times = []
        for i in range(a.repeats + 1):
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-m", "prefcli", *args], capture_output=True, text=True, cwd=ROOT, env=env
            )
            dt = time.perf_counter() - t0
            if res.returncode != 0:
                return {"error": f"prefcli {' '.join(args)} exited {res.returncode}: {res.stderr[-1000:]}"}
            if i:  # the first run warms the file cache
                times.append(dt)
        out[f"{name}_s"] = round(statistics.median(times), 3)
        out[f"{name}_runs_s"] = [round(t, 3) for t in times]
    return out


# ----------------------------------------------------------------------------- main


def record(a, res: dict) -> dict:
    row = {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine(), **res}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    print("RESULT " + json.dumps(row), flush=True)
    return row


def one(a) -> dict:
    with tempfile.TemporaryDirectory() as d:
        fn = run_prefcli if a.impl == "prefcli" else run_trl
        res = fn(a, Path(d))
    precision = a.precision if _cuda() else "fp32"  # on CPU both sides train in fp32
    return {
        "impl": a.impl,
        "mode": a.mode,
        "size": a.size,
        "batch": a.batch,
        "precision": precision,
        "compile": a.compile,
        "grad_ckpt": a.grad_ckpt,
        **({"parallel": a.parallel, "nproc": a.nproc} if a.impl == "prefcli" else {}),
        **res,
    }


def child(a, **over) -> dict:
    """One measurement in a fresh process."""
    args = [sys.executable, __file__, "run"]
    merged = {**vars(a), **over}
    for k in ("impl", "mode", "size", "batch", "steps", "warmup", "precision", "prompts", "kl", "parallel", "nproc"):
        args += [f"--{k}", str(merged[k])]
    for k in ("compile", "grad_ckpt", "no_graphs"):
        if merged[k]:
            args.append(f"--{k.replace('_', '-')}")
    res = subprocess.run(args, capture_output=True, text=True, timeout=a.timeout)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"impl": merged["impl"], "mode": merged["mode"], "error": (res.stderr or res.stdout)[-1500:]}


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | impl | batch | precision | step s | tokens/s | peak GiB | extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('mode')} | {r.get('impl')} | | | error | {r['error'][-200:]!r} | | |")
            continue
        extra = {
            k: r[k]
            for k in ("parallel", "nproc", "gen_tokens_per_s", "rollout_s", "mfu", "compile", "grad_ckpt")
            if r.get(k)
        }
        lines.append(
            f"| {r['mode']} | {r['impl']} | {r['batch']} | {r.get('precision')} | {r['step_s']} | "
            f"{r['trained_tokens_per_s']:,} | {r.get('peak_mem_gib')} | {extra} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "all", "sampler", "startup", "parallel"])
    ap.add_argument("--impl", choices=["prefcli", "trl"], default="prefcli")
    ap.add_argument("--mode", choices=["sft", "dpo", "grpo"], default="sft")
    ap.add_argument("--modes", default="sft,grpo", help="for 'all': comma-separated modes")
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=1, help="rlhf: prompts per rollout (x 8 generations)")
    ap.add_argument("--kl", type=float, default=0.0, help="rlhf: kl_coef (TRL's GRPO default beta is 0)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="bf16", help="prefcli on GPU (TRL trains the bf16 model as given)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--gen-batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5, help="startup: timed runs per command (median)")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="prefcli: runtime.parallel")
    ap.add_argument("--nproc", type=int, default=1, help="prefcli: processes under torchrun (1: no torchrun)")
    ap.add_argument("--rounds", type=int, default=2, help="'parallel': ddp/fsdp pairs, alternated in one sitting")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.what == "run":
        record(a, one(a))
        return
    if a.what == "startup":
        res = run_startup(a)
        if "error" in res:
            sys.exit(res["error"])
        record(a, {"mode": "startup", **res})
        print(
            f"prefcli --help {res['help_s']} s, prefcli validate recipes/tiny/sft.yaml {res['validate_s']} s "
            f"(median of {a.repeats} whole-process runs after a warm-up)"
        )
        return
    if a.what == "sampler":
        a.gen_batch = a.gen_batch or (64 if _cuda() else 32)
        record(a, {"mode": "sampler", "size": a.size, **run_sampler(a)})
        return
    if a.what == "parallel":  # the same prefcli workload under ddp and fsdp, alternated, in one sitting
        a.nproc = max(a.nproc, 2)
        rows = []
        for mode in a.modes.split(","):
            for _ in range(a.rounds):
                for par in ("ddp", "fsdp"):
                    r = child(a, impl="prefcli", mode=mode, parallel=par)
                    rows.append(record(a, r) if "error" not in r else r)
        print(table(rows))
        return
    rows = []
    for mode in a.modes.split(","):
        for impl in ("trl", "prefcli"):
            r = child(a, impl=impl, mode=mode)
            rows.append(record(a, r) if "error" not in r else r)
    print(table(rows))
    by = {(r.get("mode"), r.get("impl")): r for r in rows if "error" not in r}
    for mode in a.modes.split(","):
        t, p = by.get((mode, "trl")), by.get((mode, "prefcli"))
        if t and p:
            print(
                f"{mode}: prefcli/TRL tokens/s = {p['trained_tokens_per_s'] / t['trained_tokens_per_s']:.2f}x, "
                f"step time ratio prefcli/TRL = {p['step_s'] / t['step_s']:.2f}"
            )


if __name__ == "__main__":
    main()
