"""The cost of falling back to transformers `generate` for RL sampling, per model family, on this machine.

For each family of tests/test_families.py at the size of the bundled kjv-base model (hidden 256, 4 layers,
the bundled 4,096-token tokenizer) and at the quickstart RL shape (32 sequences = 8 prompts x 4, 24 new
tokens, temperature 1): the CPU seconds (one torch thread) and new tokens per second of prefcli's FastDecoder
and of HFSampler (what the RL code falls back to), interleaved (fast, hf, fast, hf, ...) so that both see the
same machine load; the median of --repeats each after a warm-up. fp32, eager (no CUDA graphs, no compile: a
CPU). On a shared machine the CPU-time ratio is the steadier figure.

    python bench/families.py --repeats 3 > bench/results/<date>-families-cpu.jsonl

One JSON row per family, then one row for the bundled kjv-base model itself; each row carries the date,
commit, machine and load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIMS = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
MHA = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4)
FAMILIES = {
    "llama": ("llama", DIMS),
    "qwen2": ("qwen2", DIMS),
    "qwen3": ("qwen3", dict(DIMS, head_dim=64)),
    "mistral-window16": ("mistral", dict(DIMS, sliding_window=16)),
    "gemma2": ("gemma2", dict(DIMS, head_dim=64, sliding_window=16)),
    "gemma3": ("gemma3_text", dict(DIMS, head_dim=64, sliding_window=16)),
    "phi3": ("phi3", DIMS),
    "gpt2": ("gpt2", dict(MHA, max_position_embeddings=256)),
    "gpt_neox": ("gpt_neox", dict(MHA, intermediate_size=688)),
    "opt": ("opt", dict(MHA, ffn_dim=688, word_embed_proj_dim=256, max_position_embeddings=256)),
    "granite": ("granite", dict(DIMS, logits_scaling=8.0)),
    "cohere": ("cohere", dict(DIMS, logit_scale=0.0625)),
}


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {
        "date": datetime.date.today().isoformat(),
        "commit": commit.strip(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores",
        "load_avg_1min": round(os.getloadavg()[0], 1),
    }


def measure(lm, tok, repeats: int) -> dict:
    import torch

    from prefcli.engine.dist import Runtime
    from prefcli.engine.rollout import FastDecoder
    from prefcli.engine.sampling import HFSampler, SamplingConfig, left_pad

    texts = [json.loads(x)["prompt"] for x in (ROOT / "data/quickstart/prompts.jsonl").read_text().splitlines()[:8]]
    prompts = [tok(t)["input_ids"][:24] for t in texts for _ in range(4)]
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    N = 24
    cfg = SamplingConfig(max_new_tokens=N, min_new_tokens=N, temperature=1.0, pad_token_id=tok.pad_token_id)
    fast = FastDecoder(lm, batch=len(prompts), max_len=ids.shape[1] + N, dtype=torch.float32, use_graph=False)
    hf = HFSampler(lm, Runtime(device=torch.device("cpu"), precision="fp32").autocast)
    wall = {"fast": [], "hf": []}
    cpu = {"fast": [], "hf": []}
    for rep in range(repeats + 1):
        for name, sampler in (("fast", fast), ("hf", hf)):
            t0, c0 = time.perf_counter(), time.process_time()
            r = sampler.sample(ids, mask, cfg)
            if rep:  # the first round warms up
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
            assert int(r.completion_mask.sum()) == len(prompts) * N
    tokens = len(prompts) * N
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in wall}
    return {
        "sequences": len(prompts),
        "new_tokens": N,
        "fast_tokens_per_s": round(tokens / med["fast"][0], 1),
        "hf_tokens_per_s": round(tokens / med["hf"][0], 1),
        "fast_cpu_s": round(med["fast"][1], 3),
        "hf_cpu_s": round(med["hf"][1], 3),
        # CPU seconds are the steadier measure on a shared machine (wall time counts other processes' load)
        "hf_over_fast_cpu": round(med["hf"][1] / med["fast"][1], 2),
        "hf_over_fast_wall": round(med["hf"][0] / med["fast"][0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time measures the work alone)")
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prefcli.engine.models import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(ROOT / "prefcli/assets/kjv-base")
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    for name, (arch, kw) in FAMILIES.items():
        if a.only and name not in a.only:
            continue
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=len(tok), **ids, **kw)).eval()
        row = {"family": name, "params_m": round(sum(p.numel() for p in lm.parameters()) / 1e6, 2)}
        print(json.dumps({**row, **measure(lm, tok, a.repeats), **machine()}), flush=True)
    if not a.only or "kjv-base" in a.only:
        lm = AutoModelForCausalLM.from_pretrained(ROOT / "prefcli/assets/kjv-base").eval()
        print(json.dumps({"family": "kjv-base (llama)", **measure(lm, tok, a.repeats), **machine()}), flush=True)


if __name__ == "__main__":
    main()
