"""Wall time of multi-turn episodes (docs/environments.md, Measured): each turn continued from the KV cache
(`continue_from`) against each turn prefilled afresh (`sample`), same model, seeds and sampler, on the fast decoder
and on transformers generate; guess-the-number from the format SFT (recipes/tiny/sft-env-format.yaml), 64
episodes of up to 3 turns of at most 4 tokens, 3 repeats each. One thread.

    python bench/env_turns.py [MODEL_DIR]      # default: runs/env/format-sft/final
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefcli.algos.rlhf.env_rollout import TurnSampler
from prefcli.engine.rollout import FastDecoder
from prefcli.engine.sampling import HFSampler, SamplingConfig
from prefcli.envs.episode import ChatRenderer, EnvPool, EpisodeConfig, play_episodes
from prefcli.envs.loading import build_factory
from prefcli.recipe.envs import PythonEnv

B, N, REPEATS = 64, 4, 3


class Fresh(TurnSampler):
    """Every turn prefilled afresh from the trajectory's token ids (the cache never continued)."""

    def _appended(self, slots, contexts):
        return None


def main(model_dir: str) -> None:
    torch.set_num_threads(1)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    factory = build_factory(PythonEnv(kind="python", path="prefcli.envs.bundled.guess:GuessNumber"))
    scfg = SamplingConfig(
        max_new_tokens=N, temperature=1.0, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    cfg = EpisodeConfig(max_turns=3, max_new_tokens=N, max_episode_tokens=96)
    for kind in ("fast", "hf"):
        for cls in (TurnSampler, Fresh):
            times, steps = [], 0
            for rep in range(REPEATS):
                if kind == "fast":
                    sampler = FastDecoder(lm, batch=B, max_len=96 + 4 * N, dtype=torch.float32)
                else:
                    sampler = HFSampler(lm)
                policy = cls(sampler, tok, scfg, [], B, "cpu")
                torch.manual_seed(rep)
                t0 = time.perf_counter()
                eps = play_episodes(EnvPool(factory), list(range(B)), policy, ChatRenderer(tok), cfg)
                times.append(time.perf_counter() - t0)
                steps += sum(e.turns for e in eps)
            per_step = 1000 * sorted(times)[REPEATS // 2] / (steps / REPEATS)
            print(
                f"{kind:4} {cls.__name__:12} calls {policy.calls}  wall s {[round(t, 2) for t in times]}  "
                f"{per_step:.1f} ms per episode step (median)",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/env/format-sft/final")
