"""`prefcli rlhf` in an environment: the trainer's tokens are the sampled tokens (no decode and re-encode), the
loss reaches the policy's tokens only, the sampler's log-probs match the trainer's, each algorithm runs on
episodes, failing environments are counted or fatal (exit 1), and a run resumed mid-rollout is exact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from prefcli.algos.rlhf.env_rollout import EpisodeRollout, episode_sequences
from prefcli.algos.rlhf.episodes import episode_batch
from prefcli.algos.rlhf.learner import sequences
from prefcli.envs.episode import ChatRenderer, EnvPool, EpisodeConfig, TurnSample, play_episodes

from .conftest import ROOT, TINY_INIT, TOKENIZER, deep_update, last_json, losses, read_metrics
from .test_envs import _factory, tok  # noqa: F401  (the module's tokenizer fixture)
from .test_rlhf import _build


def env_recipe(**upd):
    r = {
        "command": "rlhf",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "env": {
            "kind": "python",
            "path": "prefcli.envs.bundled.guess:GuessNumber",
            "args": {"max_guesses": 3},
            "max_turns": 3,
            "max_episode_tokens": 72,
            "eval_episodes": 4,
        },
        "generation": {"max_new_tokens": 6},
        "rlhf": {"num_generations": 2, "prompts_per_rollout": 2, "kl_coef": 0.05},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3},
        "output": {"plot": False},
    }
    return deep_update(r, upd)


# ------------------------------------------------------------------------------------- token identity


def test_sampled_tokens_are_trained_as_sampled_though_retokenising_would_change_them(tok):  # noqa: F811
    """The policy says 'seven' one character per token (not how the tokenizer would encode it): the trajectory
    and the training tensors keep those tokens, where decoding the conversation and encoding it again would
    give other ids (the second assertion shows this test would catch a decode-and-retokenise)."""
    chars = [tok.convert_tokens_to_ids(c) for c in "seven"]
    assert tok.unk_token_id not in chars
    turns = [chars + [tok.eos_token_id], [tok.convert_tokens_to_ids("7"), tok.eos_token_id]]

    def policy(slots, contexts, budgets):
        n = policy.turn
        policy.turn += 1
        return [TurnSample(list(turns[n]), [-0.5] * len(turns[n]), True) for _ in slots]

    policy.turn = 0
    f = _factory("prefcli.envs.bundled.guess:GuessNumber", low=7, high=8, max_guesses=2)
    cfg = EpisodeConfig(max_turns=2, max_new_tokens=8, max_episode_tokens=128)
    (e,) = play_episodes(EnvPool(f), [0], policy, ChatRenderer(tok), cfg)
    sampled = [t for t, m in zip(e.ids, e.policy_mask) if m]
    assert sampled[: len(turns[0])] == turns[0]
    assert tok(tok.decode(e.ids), add_special_tokens=False)["input_ids"] != e.ids
    b = episode_batch([e], tok.pad_token_id, 1.0, "cpu")
    assert b.completion_ids[b.completion_mask.bool()].tolist() == sampled
    assert torch.cat(
        [b.prompt_ids[b.prompt_mask.bool()], b.completion_ids[b.completion_attention.bool()]]
    ).tolist() == (e.ids)
    seq = episode_sequences(b)
    assert (seq["targets"] != -100).sum() == len(sampled)


def _record_turns(learner):
    """Wrap the learner's turn sampler: what it returned, per episode slot, in order."""
    inner = learner.env.policy
    seen: dict[int, list[int]] = {}

    def policy(slots, contexts, budgets):
        out = inner(slots, contexts, budgets)
        for s, t in zip(slots, out):
            seen.setdefault(s, []).extend(t.tokens)
        return out

    policy.gen_s = 0.0
    policy.reset = inner.reset
    learner.env.policy = policy
    return seen


def test_the_learner_trains_the_sampled_tokens_with_matching_log_probs(tmp_path, write_recipe):
    """One rollout of the real learner (ppo: it keeps the rollout-time forward): per episode, the tokens with a
    target are exactly the tokens the sampler returned, turn after turn; the environment's tokens are attended
    but have no target; the trainer's log-probs equal the sampler's (CPU fp32)."""
    L = _build(write_recipe(env_recipe(rlhf={"algorithm": "ppo"})), tmp_path)
    seen = _record_turns(L)
    L.rollout()
    b = L.buffer
    comp = b["targets"].shape[1]
    P = int(b["start"]) + 1
    for i in range(L.shape.sequences):
        tgt = b["targets"][i]
        assert tgt[tgt != -100].tolist() == seen[i], i
        env_tokens = (b["attention_mask"][i, P : P + comp] == 1) & (tgt == -100)
        assert env_tokens.any(), "an episode of several turns has environment tokens between its turns"
    m = b["mask"].bool()
    assert torch.equal(m, b["targets"] != -100)
    assert (b["old_logp"][m] - b["sampler_logp"][m]).abs().max() < 1e-4
    assert L.rollout_metrics["mismatch/abs_mean"] < 1e-5
    for key in ("env/success_rate", "env/turns", "env/tool_calls", "env/tool_errors", "env/episode_tokens"):
        assert key in L.rollout_metrics, key
    assert L.rollout_metrics["env/turns"] > 1


def test_the_loss_reaches_only_the_policy_tokens(tmp_path, write_recipe, tok):  # noqa: F811
    """A hand-built trajectory (prompt, a policy turn, an environment reply, a policy turn) through the learner's
    loss: the gradient on the logits that predict the environment's tokens is exactly 0, on the policy's not."""
    L = _build(write_recipe(env_recipe(rlhf={"algorithm": "grpo"})), tmp_path)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    from prefcli.envs.episode import Episode

    prompt, t1, reply, t2 = enc("guess a number"), enc("4") + [tok.eos_token_id], enc("\nhigher"), enc("6")
    ids = prompt + t1 + reply + t2
    mask = [0] * len(prompt) + [1] * len(t1) + [0] * len(reply) + [1] * len(t2)
    e = Episode(seed=0, ids=ids, policy_mask=mask, sampler_logp=[0.0] * len(ids), prompt_len=len(prompt))
    e.turn_ends, e.turn_rewards = [len(prompt) + len(t1) - 1, len(ids) - 1], [0.0, 1.0]
    b = episode_batch([e], tok.pad_token_id, 1.0, "cpu")
    r = EpisodeRollout(
        b.prompt_ids,
        b.prompt_mask,
        b.completion_ids,
        b.completion_mask,
        b.finished,
        b.logprobs,
        completion_attention=b.completion_attention,
    )
    mb = {**sequences(r), "mask": b.completion_mask.float(), "adv": torch.ones_like(b.logprobs)}
    grads = []  # the gradient on the last hidden states, which feed only the output layer (position t: target t+1)

    def keep(module, inputs, out):
        out.last_hidden_state.register_hook(grads.append)

    h = L.policy._body.register_forward_hook(keep)
    try:
        L.model.train()
        loss, _ = L.loss(L.model, mb)
        loss.backward()
    finally:
        h.remove()
    (g,) = grads
    per_pos = g[0].abs().sum(-1)  # [T]
    N = b.completion_ids.shape[1]
    start = int(mb["start"])
    rows = per_pos[start : start + N]  # the positions that predict completion token j
    assert (per_pos[:start] == 0).all()
    pol = b.completion_mask[0].bool()
    assert (rows[~pol] == 0).all() and (rows[pol] > 0).all()
    assert sequences(r)["attention_mask"].sum() == len(ids)  # the reply is attended (it is context)


# ----------------------------------------------------------------------------------------- the runs


@pytest.mark.parametrize(
    "algo",
    ["grpo", "ppo", pytest.param("reinforce_pp", marks=pytest.mark.slow), pytest.param("rloo", marks=pytest.mark.slow)],
)
def test_algorithms_on_episodes(algo, tmp_path, write_recipe, cli):
    code, stdout, stderr = cli("rlhf", write_recipe(env_recipe(rlhf={"algorithm": algo})), "-o", tmp_path / "r", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    f = s["final"]
    assert s["steps"] == 2 and s["data"]["env"] == "prefcli.envs.bundled.guess:GuessNumber"
    for key in ("env/success_rate", "env/turns", "env/tool_call_validity", "reward/env", "eval/success_rate"):
        assert key in f, key
    assert f["mismatch/abs_max"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dapo", "gspo", "cispo", "online_dpo", "dr_grpo"])
def test_more_algorithms_on_episodes(algo, tmp_path, write_recipe, cli):
    extra = {
        "dapo": {"algorithm": "grpo", "grpo_loss": "dapo", "dynamic_sampling": True, "overlong_buffer": 16},
        "dr_grpo": {"algorithm": "grpo", "grpo_loss": "dr_grpo"},
        "gspo": {"algorithm": "grpo", "policy_loss": "gspo"},
        "cispo": {"algorithm": "grpo", "policy_loss": "cispo"},
    }.get(algo, {"algorithm": algo})
    d = env_recipe(rlhf=extra)
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "r", "-q")
    assert code in (0, 1), stderr
    if code == 1:  # online_dpo may find no pair on a random model in two rollouts: its own clear error
        assert algo == "online_dpo" and "no preference pair exists" in stderr, stderr
        return
    assert "env/success_rate" in last_json(stdout)["final"]


def test_a_hanging_environment_is_counted_or_fatal(tmp_path, write_recipe, cli):
    d = env_recipe(train={"eval_every_steps": None})
    d["env"].update(path="tests.env_cases:Hangs", args={}, timeout_s=0.3)
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "skip", "-q")
    assert code == 0, stderr
    f = last_json(stdout)["final"]
    assert f["env/timeouts"] == 1.0 and f["env/errors"] == 1.0 and f["reward/mean"] == 0.0
    d["env"]["on_error"] = "fatal"
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "fatal", "-q")
    assert code == 1, stderr
    s = last_json(stdout)
    assert s["status"] == "failed" and "tests.env_cases:Hangs" in s["error"] and "env.on_error is fatal" in s["error"]


def test_resume_in_the_middle_of_a_rollout_with_an_environment_is_exact(tmp_path, write_recipe, cli):
    d = env_recipe(
        rlhf={"algorithm": "ppo", "epochs_per_rollout": 2, "minibatches_per_epoch": 2},
        train={"max_steps": 6, "save_every_steps": 1, "keep_checkpoints": 10, "eval_every_steps": None},
    )
    p = write_recipe(d)
    code, _, stderr = cli("rlhf", p, "-o", tmp_path / "full", "-q")
    assert code == 0, stderr
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", tmp_path / "resumed" / "checkpoints" / "step-2")
    code, stdout, stderr = cli("rlhf", p, "-o", tmp_path / "resumed", "-q", "--resume")
    assert code == 0, stderr
    a, b = losses(tmp_path / "full", "loss/ppo"), losses(tmp_path / "resumed", "loss/ppo")
    assert sorted(b) == [3, 4, 5, 6]
    for step in b:
        assert b[step] == a[step], step
    ra = {m["step"]: m.get("env/success_rate") for m in read_metrics(tmp_path / "full") if "env/success_rate" in m}
    rb = {m["step"]: m.get("env/success_rate") for m in read_metrics(tmp_path / "resumed") if "env/success_rate" in m}
    assert all(ra[s] == rb[s] for s in rb)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["guess", "secret", "dialogue"])
def test_the_tiny_env_recipes_run_with_smoke(name, tmp_path, cli):
    path = ROOT / "recipes" / "tiny" / f"rlhf-env-{name}.yaml"
    code, stdout, stderr = cli("rlhf", path, "--smoke", "-o", tmp_path / "r", "-q")
    assert code == 0, stderr
    f = last_json(stdout)["final"]
    assert "env/success_rate" in f and f["mismatch/abs_max"] < 1e-4
    if name == "secret":
        assert "env/tool_calls" in f and "env/tool_call_validity" in f
    if name == "dialogue":
        assert "reward/keyword" in f and "value/loss" in f


@pytest.mark.slow
@pytest.mark.parametrize("name", ["format", "secret"])
def test_the_env_sft_recipes_run_with_smoke(name, tmp_path, cli):
    """The SFT stages the environments' quickstart recipes start from read their played episodes."""
    code, stdout, stderr = cli(
        "sft", ROOT / "recipes" / "tiny" / f"sft-env-{name}.yaml", "--smoke", "-o", tmp_path, "-q"
    )
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["data"]["format"] == "messages" and s["data"]["dropped"] == 0 and s["data"]["truncated"] == 0


# --------------------------------------------------------------------------------------------- eval


def test_eval_plays_the_environment_as_a_benchmark(tmp_path, write_recipe, cli, tiny_model_dir):
    """metric env: each model plays the same seeds; success rate, reward, turns, tool errors per model, a row
    per episode with its transcript; the same seed gives the same result."""
    d = {
        "command": "eval",
        "models": [{"name": "a", "path": str(tiny_model_dir)}, {"name": "b", "path": str(tiny_model_dir)}],
        "env": {
            "kind": "python",
            "path": "prefcli.envs.bundled.secret:SecretNumber",
            "tool_format": "pythonic",
            "system_prompt": "Tools: read_secret()",
            "max_turns": 2,
            "max_episode_tokens": 64,
            "eval_episodes": 6,
        },
        "generation": {"max_new_tokens": 6, "batch_size": 4},
        "metrics": ["env"],
    }
    code, stdout, stderr = cli("eval", write_recipe(d), "-o", tmp_path / "e", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    a, b = s["models"]["a"]["env"], s["models"]["b"]["env"]
    assert a == {**b, "sampling_s": a["sampling_s"]}  # same model, same seeds: the same episodes
    assert a["episodes"] == 6 and a["seeds"] == [1_000_000_000, 1_000_000_005]
    for k in ("success_rate", "env_reward", "turns", "tool_calls", "tool_error_rate"):
        assert k in a, k
    rows = [json.loads(x) for x in (tmp_path / "e" / "examples.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r.get("model") == "a"]
    assert len(mine) == 6 and all(r["turns"] >= 1 and r["transcript"] for r in mine)
    assert sum(r["success"] for r in mine) / 6 == a["success_rate"]
    # generate prints transcripts: the same model, seeds and settings play the same first episodes
    code, stdout, stderr = cli("generate", "--recipe", write_recipe(d), "--episodes", "2", "-q")
    assert code == 0, stderr
    lines = [json.loads(x) for x in stdout.strip().splitlines()]
    assert [x["env_seed"] for x in lines] == [1_000_000_000, 1_000_000_001]
    assert lines[0]["messages"][0] == {"role": "system", "content": "Tools: read_secret()"}
    assert lines[0]["transcript"].startswith("<|im_start|>system\nTools: read_secret()")


# --------------------------------------------------------------------------------------------- fsdp


@pytest.mark.slow
def test_two_processes_fsdp_and_ddp_agree_with_an_environment(tmp_path, write_recipe):
    """2 ranks on CPU (gloo), each playing its own seeds: FSDP and DDP measure the same rollouts and updates; and
    FSDP with transformers' generate as the sampler (whose calls gather the sharded weights, so a rank whose
    episodes ended sooner makes idle calls) completes. 9 held-out episodes: 4 on one rank, 5 on the other, which
    the evaluation plays in one and two sampling batches of 4: both ranks play two, the first with one episode
    that counts nothing, so that every collective call has both ranks."""
    import subprocess

    from .test_fsdp import TORCHRUN, env, free_port, near

    rec = write_recipe(env_recipe(train={"max_steps": 3}, env={"eval_episodes": 9}))
    jobs = [
        {"command": "rlhf", "recipe": str(rec), "out": str(tmp_path / name), "set": sets}
        for name, sets in (
            ("fsdp", ["runtime.parallel=fsdp"]),
            ("ddp", []),
            ("fsdp_hf", ["runtime.parallel=fsdp", "generation.sampler=hf"]),
        )
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run(
        [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(ROOT / "tests" / "dist_jobs.py")]
        + [str(tmp_path / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env(),
    )
    assert res.returncode == 0, res.stderr[-5000:]
    ddp, fsdp = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp")
    assert len(ddp) == len(fsdp) == 4
    for a, b in zip(ddp, fsdp):
        for k, v in a.items():
            if isinstance(v, float) and not k.startswith("perf/") and k != "time_s":
                assert near(b[k], v), (k, b[k], v)
    s = json.loads((tmp_path / "fsdp_hf" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["rlhf"]["sampler"] == "HFSampler" and "env/success_rate" in s["final"]
    evals = [m for m in ddp + fsdp if "eval/success_rate" in m]
    assert evals and all(m["eval/episodes"] == 9 for m in evals)  # each held-out episode counted once


# ------------------------------------------------------------------------------------ the KV cache across turns


@pytest.mark.parametrize("kind", ["fast", "hf"])
def test_turns_continued_from_the_cache_score_as_one_forward_of_the_whole_trajectory(kind, tok, tiny_model_dir):  # noqa: F811
    """Episodes of three turns, the second and third continued from the sampler's KV cache (continue_from):
    the trajectory's policy tokens and the sampler's log-probs equal what one forward of the whole trajectory
    (prompt, turns and replies, as the trainer runs it) gives, on the fast decoder and on transformers' generate."""
    from transformers import AutoModelForCausalLM

    from prefcli.algos.rlhf.env_rollout import TurnSampler
    from prefcli.engine.dist import Runtime
    from prefcli.engine.models import PolicyLM
    from prefcli.engine.rollout import FastDecoder
    from prefcli.engine.sampling import HFSampler, SamplingConfig

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    B, N = 4, 5
    scfg = SamplingConfig(
        max_new_tokens=N, temperature=1.0, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    sampler = FastDecoder(lm, batch=B, max_len=160, dtype=torch.float32) if kind == "fast" else HFSampler(lm)
    policy = TurnSampler(sampler, tok, scfg, [], B, "cpu")
    f = _factory("tests.env_cases:Counter", n=3)
    cfg = EpisodeConfig(max_turns=3, max_new_tokens=N, max_episode_tokens=120)
    eps = play_episodes(EnvPool(f), [0, 1, 2, 3], policy, ChatRenderer(tok), cfg)
    assert all(e.turns == 3 for e in eps)
    assert policy.calls == {"sample": 1, "continue_from": 2}, policy.calls
    b = episode_batch(eps, tok.pad_token_id, 1.0, "cpu")
    seq = episode_sequences(b)
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    with torch.no_grad():
        lp, _ = PolicyLM(lm, rt)(
            seq["input_ids"], seq["targets"], seq["attention_mask"], seq["position_ids"], start=int(seq["start"])
        )
    m = b.completion_mask.bool()
    assert m.sum() >= 3 * B
    assert (lp[m] - b.logprobs[m]).abs().max() < 1e-4


def test_mask_truncated_completions_leaves_out_the_episodes_the_environment_did_not_end(tmp_path, write_recipe, cli):
    """Counter(n=3) ends after its third step: with max_turns 3 every episode is finished and trains; with
    max_turns 2 every episode is cut, so the mask leaves the whole rollout out and the run says which limits."""
    d = env_recipe(rlhf={"mask_truncated_completions": True}, train={"eval_every_steps": None})
    d["env"].update(path="tests.env_cases:Counter", args={"n": 3}, max_turns=3, max_episode_tokens=200)
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "ended", "-q")
    assert code == 0, stderr
    assert last_json(stdout)["final"]["env/turns"] == 3.0
    d["env"]["max_turns"] = 2
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "cut", "-q")
    assert code == 1, stderr
    err = last_json(stdout)["error"]
    assert "the environment ended none of the episodes" in err and "env.max_turns (2)" in err, err
    assert "max_new_tokens (" not in err
