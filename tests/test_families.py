"""Model families against their own transformers forward: prefcli's log-prob kernels (padded and packed rows)
and its fast sampler (greedy token for token against `generate`, and its log-probs), then sft (packed), dpo,
grpo and generate for a step each. Every family is a tiny random model built from its transformers config class;
a family transformers adds later is one line in FAMILIES (docs/families.md)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prefcli.engine.data import TokenizedSet, pack_rows, packed_batch, pad_batch
from prefcli.engine.dist import Runtime
from prefcli.engine.guard import _own_logits_of, compare_logprobs, compare_rollout
from prefcli.engine.models import PolicyLM
from prefcli.engine.rollout import FastDecoder, supports_fast_decoder
from prefcli.engine.sampling import SamplingConfig, left_pad

from .conftest import DATA, TOKENIZER, last_json

_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_MHA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)

# name: (transformers model_type, config overrides). Windows of 4 tokens and soft-caps of 1-3 bite on these
# sequences; initializer_range 0.2 gives the random models opinions, so that a missed quirk shows.
FAMILIES = {
    "llama": ("llama", _L),
    "qwen2": ("qwen2", _L),
    "qwen3": ("qwen3", dict(_L, head_dim=8)),
    "mistral": ("mistral", _L),
    "mistral-window4": ("mistral", dict(_L, sliding_window=4)),
    "gemma2": (
        "gemma2",
        dict(_L, head_dim=8, sliding_window=4, final_logit_softcapping=2.0, attn_logit_softcapping=1.0),
    ),
    "gemma3": (
        "gemma3_text",
        dict(
            _L,
            head_dim=8,
            sliding_window=4,
            final_logit_softcapping=3.0,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),  # fmt: skip
    "phi3": ("phi3", dict(_L, partial_rotary_factor=0.5)),
    "gpt2": ("gpt2", dict(_MHA, max_position_embeddings=128)),
    "gpt_neox": ("gpt_neox", dict(_MHA, intermediate_size=64)),
    "opt": ("opt", dict(_MHA, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=128)),
    "granite": (
        "granite",
        dict(_L, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3),
    ),  # fmt: skip
    "cohere": ("cohere", dict(_L, logit_scale=0.5, use_qk_norm=True)),
}

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "Jesus wept.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models are latency-bound: one thread is as fast, and far faster on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny(name: str, tok):
    arch, kw = FAMILIES[name]
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), initializer_range=0.2, **ids, **kw)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    lm.config.use_cache = False  # as build_trained_model leaves it (and packed rows need it: no cache, no mask)
    return lm


@pytest.mark.parametrize("name", FAMILIES)
def test_logprobs_and_fast_sampler_equal_the_models_own_forward(name, tok):
    lm = tiny(name, tok)
    policy = PolicyLM(lm, Runtime(device=torch.device("cpu"), precision="fp32"))
    ids = [tok(t)["input_ids"] for t in TEXTS]
    data = TokenizedSet(input_ids=ids, labels=ids, n_rows=len(ids), n_truncated=0, n_dropped=0, rows=list(range(5)))
    padded = pad_batch(ids, ids, tok.pad_token_id)  # right-padded, as sft/dpo batches
    packed = packed_batch(pack_rows(range(5), data, 48), data, tok.pad_token_id, 48)  # several examples a row
    assert (packed["position_ids"][0] == 0).sum() > 2
    with torch.no_grad():  # the guard's reference batches examples right-padded: each row is the example alone
        alone = _own_logits_of(policy, [torch.tensor(x) for x in ids], None)
        for x, z in zip(ids, alone):
            assert (z - policy(torch.tensor([x]), None, mode="logits")[0]).abs().max() < 1e-5, name
    for batch in (padded, packed):
        kernel, own_packed = compare_logprobs(policy, batch, k=5)
        assert kernel.tokens > 40 and kernel.max_abs < 1e-4, (name, kernel)
        assert own_packed is None or own_packed.max_abs < 1e-4, (name, own_packed)

    ok, why = supports_fast_decoder(lm)
    assert ok, why
    p_ids, p_mask = left_pad([tok(t)["input_ids"][:n] for t, n in zip(TEXTS, (3, 9, 5, 2, 7))], tok.pad_token_id, "cpu")
    n = 8  # with the longest prompt, past the windows of 4
    dec = FastDecoder(lm, batch=5, max_len=p_ids.shape[1] + n, dtype=torch.float32)
    greedy = SamplingConfig(max_new_tokens=n, temperature=0, pad_token_id=tok.pad_token_id)
    r = dec.sample(p_ids, p_mask, greedy)
    want = lm.generate(
        input_ids=p_ids, attention_mask=p_mask, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
        eos_token_id=None, use_cache=True,
    )[:, p_ids.shape[1] :]  # fmt: skip
    assert torch.equal(r.completion_ids, want), name
    torch.manual_seed(0)
    warped = SamplingConfig(max_new_tokens=n, temperature=0.8, top_k=50, pad_token_id=tok.pad_token_id)
    for cfg, rollout in ((greedy, r), (warped, dec.sample(p_ids, p_mask, warped))):
        trainer, sampler = compare_rollout(policy, rollout, cfg, k=5)  # the guard's check on the first rollout
        assert trainer.tokens == sampler.tokens == 5 * n, (name, trainer, sampler)
        assert trainer.max_abs < 1e-4 and sampler.max_abs < 1e-4, (name, cfg.temperature, trainer, sampler)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    out = {}
    for name in FAMILIES:
        d = tmp_path_factory.mktemp(name)
        tiny(name, tok).save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = d
    return out


def _recipe(command: str, path, **extra) -> dict:
    r = {
        "command": command,
        "model": {"path": str(path)},
        "train": {"max_steps": 1, "batch_size": 2, "lr": 1e-3, "seed": 0},
        "output": {"plot": False, "save_final": False},
    }
    r.update(extra)
    return r


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_sft_dpo_grpo_and_generate_run(name, model_dirs, tmp_path, write_recipe, cli):
    """A step of each, through the start-up guard (which refuses a family whose kernels or sampler differ)."""
    path = model_dirs[name]
    runs = {
        "sft": _recipe(
            "sft",
            path,
            data={
                "train": {"path": str(DATA / "tiny" / "text.jsonl"), "max_rows": 8},
                "max_length": 32,
                "packing": True,
            },
        ),  # fmt: skip
        "contrastive": _recipe(
            "contrastive",
            path,
            data={"train": {"path": str(DATA / "tiny" / "pref_train.jsonl"), "max_rows": 4}, "max_length": 32},
            contrastive={"objective": "dpo"},
        ),  # fmt: skip
        "rlhf": _recipe(
            "rlhf",
            path,
            data={"train": {"path": str(DATA / "tiny" / "prompts.jsonl"), "max_rows": 4}, "max_prompt_length": 16},
            rewards=[{"kind": "length", "target": 4}],
            generation={"max_new_tokens": 4},
            rlhf={"algorithm": "grpo", "num_generations": 2, "prompts_per_rollout": 1},
        ),  # fmt: skip
    }
    for command, d in runs.items():
        code, stdout, stderr = cli(command, write_recipe(d, f"{command}.yaml"), "-o", tmp_path / command, "-q")
        assert code == 0, (name, command, stderr)
        s = last_json(stdout)
        assert s["steps"] == 1 and not s["warnings"], (name, command, s["warnings"])
        if command == "rlhf":
            assert s["rlhf"]["sampler"] == "FastDecoder"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("In the beginning\n")
    code, stdout, stderr = cli("generate", path, "-p", prompts, "--max-new-tokens", "3", "--greedy", "-q")
    assert code == 0, (name, stderr)
    assert json.loads(stdout.splitlines()[0])["tokens"] >= 1


@pytest.mark.slow
def test_the_guard_stops_a_sampler_that_misses_a_family_quirk(tmp_path, write_recipe, cli, monkeypatch):
    """A family whose layout row is wrong (here: Cohere's interleaved rotary claimed for Qwen 2) samples from
    another distribution than the model's: the guard stops the run at its first samples with exit 2, naming the
    family and the sampler; with model.on_mismatch: fallback it samples with transformers generate instead."""
    from prefcli.engine import families

    from .conftest import TINY_INIT

    monkeypatch.setitem(families.DECODERS, "qwen2", families.Layout(rotary="interleaved"))
    d = {
        "command": "rlhf",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(DATA / "tiny" / "prompts.jsonl"), "max_rows": 4}, "max_prompt_length": 16},
        "rewards": [{"kind": "length", "target": 4}],
        "generation": {"max_new_tokens": 6},
        "rlhf": {"algorithm": "grpo", "num_generations": 2, "prompts_per_rollout": 2},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3},
        "output": {"plot": False, "save_final": False},
    }
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run", "-q")
    assert code == 2, stderr
    err = last_json(stdout)["error"]
    assert "qwen2: the fast sampler's log-probs" in err and "first sampled completions" in err, err
    assert "generation.sampler: hf" in err and "model.on_mismatch: fallback" in err
    d["model"]["on_mismatch"] = "fallback"
    code, stdout, stderr = cli("rlhf", write_recipe(d), "-o", tmp_path / "run2", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["rlhf"]["sampler"] == "HFSampler"
    assert any("sampling with transformers generate" in w for w in s["warnings"]), s["warnings"]
