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
from ..engine.rollout import SamplingConfig
from ..envs.episode import ChatRenderer, EnvPool, play_episodes
from ..envs.loading import build_factory


def check_env(r) -> Any:
    """The environment's factory, checked before any model loads (bad input: exit 2 naming env.*)."""
    return build_factory(r.env)


def env_results(factory, lm, tok, r, rt, rewards, rows: list[dict], name: str) -> dict:
    """One model's episodes in the recipe's environment: the metrics, and a row per episode."""
    from ..algos.rlhf.sampling import HFSampler

    spec, g = r.env, r.generation
    if not tok.chat_template:
        from ..errors import UsageError

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
    sampler = HFSampler(lm, rt)
    batch = max(1, g.batch_size)
    lm.eval()
    policy = TurnSampler(sampler, tok, scfg, g.stop, batch, rt.device, fill=False)
    seeds = [spec.eval_seed + i for i in range(spec.eval_episodes)]
    pool = EnvPool(factory)
    eps = []
    try:
        for s in range(0, len(seeds), batch):
            policy.reset()
            eps += play_episodes(pool, seeds[s : s + batch], policy, renderer, cfg)
    finally:
        pool.close()
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
        "sampling_s": round(policy.gen_s, 3),
    }
