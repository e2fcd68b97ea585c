"""`prefcli eval`, metric env: an environment as a benchmark. Each model plays env.eval_episodes episodes, one per
seed env.eval_seed, env.eval_seed + 1, ... (the same seeds for every model, so the models meet the same tasks),
sampled with the recipe's generation settings turn by turn (token in / token out, prefcli/envs/episode.py).
Reported per model: the success rate, the environment's mean reward (and the recipe's `rewards:` on the final
transcripts, when given), turns, tool calls and tool errors per episode, the tool-error rate, environment
failures; each episode's transcript is a row of examples.jsonl."""

from __future__ import annotations

from typing import Any

from ..algos.rlhf.env_rollout import TurnSampler, episode_config
from ..algos.rlhf.episodes import episode_metrics, episode_sums, transcripts
from ..engine.sampling import SamplingConfig
from ..envs.episode import ChatRenderer, EnvPool, play_episodes
from ..envs.loading import build_factory
from ..errors import UsageError


def check_env(r) -> Any:
    """The environment's factory, checked before any model loads (bad input: exit 2 naming env.*)."""
    return build_factory(r.env)


def play(factory, spec, g, lm, tok, rt, seeds: list[int], name: str):
    """Episodes of `lm` in the environment, one per seed, sampled with the generation settings `g` (transformers'
    generate, `g.batch_size` episodes at a time, each batch continued from its cache turn by turn). Returns the
    episodes, the renderer and the sampling seconds."""
    from ..engine.sampling import HFSampler

    if not tok.chat_template:
        raise UsageError(f"env: model '{name}' has no chat template; episodes are chats (set its chat_template)")
    renderer = ChatRenderer(tok, tools=factory.tools, system_prompt=spec.system_prompt)
    scfg = SamplingConfig(
        max_new_tokens=g.max_new_tokens,
        min_new_tokens=g.min_new_tokens,
        temperature=g.temperature if g.do_sample else 0.0,
        top_k=g.top_k,
        top_p=g.top_p,
        stop_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
    )
    cfg = episode_config(spec, g)
    sampler = HFSampler(lm, rt.autocast)
    batch = max(1, g.batch_size)
    lm.eval()
    policy = TurnSampler(sampler, tok, scfg, g.stop, batch, rt.device, fill=False)
    pool = EnvPool(factory)
    eps = []
    try:
        for s in range(0, len(seeds), batch):
            policy.reset()
            eps += play_episodes(pool, seeds[s : s + batch], policy, renderer, cfg)
    finally:
        pool.close()
    return eps, renderer, policy.gen_s


def env_results(factory, lm, tok, r, rt, rewards, rows: list[dict], name: str) -> dict:
    """One model's episodes in the recipe's environment: the metrics, and a row per episode."""
    spec = r.env
    seeds = [spec.eval_seed + i for i in range(spec.eval_episodes)]
    eps, renderer, gen_s = play(factory, spec, r.generation, lm, tok, rt, seeds, name)
    m = episode_metrics(episode_sums(eps), "env")
    prompts, completions = transcripts(eps, renderer)
    extra = rewards.score(prompts, completions)[0] if rewards is not None else [0.0] * len(eps)
    totals = [x + spec.reward_weight * e.env_reward for x, e in zip(extra, eps)]
    for i, (e, p, c, t) in enumerate(zip(eps, prompts, completions, totals)):
        rows.append(
            {
                "model": name,
                "index": i,
                "env_seed": e.seed,
                "prompt": p,
                "transcript": c,
                "success": e.succeeded,
                "env_reward": e.env_reward,
                "reward": t,
                "turns": e.turns,
                "tool_calls": e.tool_calls,
                "tool_errors": e.tool_errors,
                "failure": e.failure,
                "truncated": e.truncated,
            }
        )
    n = max(1, len(eps))
    return {
        "episodes": len(eps),
        "seeds": [seeds[0], seeds[-1]] if seeds else [],
        "success_rate": m["env/success_rate"],
        "env_reward": m["env/reward"],
        "reward": sum(totals) / n,
        "turns": m["env/turns"],
        "tool_calls": m["env/tool_calls"],
        "tool_errors": m["env/tool_errors"],
        "tool_error_rate": 1.0 - m["env/tool_call_validity"],
        "env_errors": m["env/errors"],
        "truncated": m["env/truncated"],
        "episode_tokens": m["env/episode_tokens"],
        "sampling_s": round(gen_s, 3),
    }


def print_episodes(opts, section, g, seed: int, rt, out, err) -> int:
    """`prefcli generate --recipe R --episodes N`: N episodes of the recipe's environment (seeds env.eval_seed,
    ...), one JSON line each on `out`: the seed, the conversation's messages, the transcript as the chat template
    writes it, the environment's reward and the counts."""
    import json

    import torch

    from ..recipe import load_recipe
    from .loading import load_lm

    r = load_recipe(opts.recipe).recipe
    spec = getattr(r, "env", None)
    if spec is None:
        raise UsageError(f"--episodes: {opts.recipe} has no env section (an rlhf or eval recipe with env: has one)")
    if opts.episodes < 1:
        raise UsageError(f"--episodes must be at least 1, got {opts.episodes}")
    if opts.prompts is not None:
        raise UsageError("--episodes plays the recipe's environment; it reads no --prompts")
    factory = check_env(r)
    lm, tok = load_lm(section, rt)
    torch.manual_seed(seed)
    seeds = [spec.eval_seed + i for i in range(opts.episodes)]
    eps, renderer, _ = play(factory, spec, g, lm, tok, rt, seeds, section.path or "model")
    for i, e in enumerate(eps):
        row = {
            "index": i,
            "env_seed": e.seed,
            "messages": e.messages,
            "transcript": renderer.transcript(e.messages) if e.messages else "",
            "success": e.succeeded,
            "env_reward": e.env_reward,
            "turns": e.turns,
            "tool_calls": e.tool_calls,
            "tool_errors": e.tool_errors,
            "failure": e.failure,
            "truncated": e.truncated,
        }
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.flush()
    if not opts.quiet:
        print(f"{len(eps)} episodes of {factory.name}", file=err, flush=True)
    return len(eps)
