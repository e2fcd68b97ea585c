"""The static-KV-cache sampler against Hugging Face: greedy decoding token for token, the
sampling distribution, stop tokens, min/max new tokens, LoRA weights and in-place weight sync."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prefcli.engine.rollout import FastDecoder, supports_fast_decoder
from prefcli.engine.sampling import HFSampler, SamplingConfig, left_pad, sample_next

from .conftest import TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny(arch, tok, seed=0, **extra):
    cfg = AutoConfig.for_model(
        arch,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def prompts(tok):
    ids = [tok(t)["input_ids"] for t in ["In the beginning", "And God said, Let there be", "Jesus"]]
    return left_pad(ids, tok.pad_token_id, "cpu")


def hf_greedy(lm, tok, ids, mask, n):
    out = lm.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("arch,extra", [("qwen2", {}), ("llama", {}), ("qwen3", {"head_dim": 8}), ("mistral", {})])
def test_greedy_equals_hf_generate(tok, arch, extra):
    lm = tiny(arch, tok, **extra)
    ids, mask = prompts(tok)
    dec = FastDecoder(lm, batch=3, max_len=ids.shape[1] + 16, dtype=torch.float32)
    r = dec.sample(
        ids,
        mask,
        SamplingConfig(
            max_new_tokens=16, temperature=0, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
        ),
    )
    ref = hf_greedy(lm, tok, ids, mask, 16)
    assert torch.equal(r.completion_ids[:, : ref.shape[1]], ref)
    assert dec.prefill(ids, mask).shape == (3, len(tok))


def test_sampling_distribution_matches_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    for cfg, keep in (
        (SamplingConfig(temperature=0.7), 5),
        (SamplingConfig(temperature=1.0, top_k=2), 2),
        (SamplingConfig(temperature=1.0, top_p=0.8), 3),
    ):
        draws = sample_next(logits.clone(), cfg)
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        z = logits[0] / cfg.temperature
        z[keep:] = float("-inf")
        want = z.softmax(-1)
        assert torch.allclose(freq, want, atol=0.015), (cfg, freq, want)


class _EosLoving(FastDecoder):
    def _logits(self, h):
        z = super()._logits(h)
        z[:, self.scfg.stop_token_ids[0]] += 1000.0
        return z


def test_stop_token_and_min_new_tokens(tok):
    lm = tiny("qwen2", tok)
    ids, mask = prompts(tok)
    eos = tok.eos_token_id
    dec = _EosLoving(lm, batch=3, max_len=ids.shape[1] + 10, dtype=torch.float32)
    r = dec.sample(
        ids,
        mask,
        SamplingConfig(
            max_new_tokens=10, min_new_tokens=3, temperature=1.0, stop_token_ids=[eos], pad_token_id=tok.pad_token_id
        ),
    )
    assert r.completion_mask.sum(-1).tolist() == [4, 4, 4]  # 3 forced tokens, then the stop token
    assert (r.completion_ids[:, :3] != eos).all() and (r.completion_ids[:, 3] == eos).all()
    assert (r.completion_ids[:, 4:] == tok.pad_token_id).all() and r.finished.all()
    plain = FastDecoder(lm, batch=3, max_len=ids.shape[1] + 5, dtype=torch.float32)
    r2 = plain.sample(
        ids, mask, SamplingConfig(max_new_tokens=5, temperature=0, stop_token_ids=[eos], pad_token_id=tok.pad_token_id)
    )
    assert r2.completion_mask.sum(-1).tolist() == [5, 5, 5] and not r2.finished.any()  # cut by max_new_tokens


def test_lora_weights_and_in_place_sync(tok):
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(tiny("llama", tok), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-trivial adapter
    ids, mask = prompts(tok)
    cfg = SamplingConfig(
        max_new_tokens=8, temperature=0, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    dec = FastDecoder(lm, batch=3, max_len=ids.shape[1] + 8, dtype=torch.float32)
    assert torch.equal(dec.sample(ids, mask, cfg).completion_ids, hf_greedy(lm, tok, ids, mask, 8))
    with torch.no_grad():  # an "optimizer step": the decoder sees it after sync(), without being rebuilt
        for n, p in lm.named_parameters():
            if "lora_A" in n:
                p.add_(torch.randn_like(p) * 0.5)
    stale = dec.sample(ids, mask, cfg).completion_ids
    dec.sync()
    fresh = dec.sample(ids, mask, cfg).completion_ids
    want = hf_greedy(lm, tok, ids, mask, 8)
    assert torch.equal(fresh, want) and not torch.equal(stale, want)


def test_unsupported_architectures_are_named(tok):
    ok, why = supports_fast_decoder(tiny("qwen2", tok))
    assert ok and why == ""
    cfg = AutoConfig.for_model("bloom", vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)
    ok, why = supports_fast_decoder(AutoModelForCausalLM.from_config(cfg))
    assert not ok and "bloom" in why and "llama" in why  # the family, and the families covered
    cfg = AutoConfig.for_model(
        "opt", vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, do_layer_norm_before=False,
    )  # fmt: skip
    ok, why = supports_fast_decoder(AutoModelForCausalLM.from_config(cfg))
    assert not ok and "do_layer_norm_before" in why
    ok, why = supports_fast_decoder(tiny("llama", tok, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    assert not ok and "dynamic" in why


@pytest.mark.parametrize("sampler", ["fast", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_trainers_in_fp32(tok, sampler, temperature):
    """The sampler returns the log-prob of every token it drew; on CPU in fp32 the trainer's forward on the
    same tokens (prefcli's PolicyLM at the same temperature) must give the same numbers: a sampler/trainer
    mismatch of ~0 (issue 15: on GPU in bf16 it is not 0, and rlhf logs it)."""
    from prefcli.algos.rlhf.learner import sequences
    from prefcli.engine.dist import Runtime
    from prefcli.engine.models import PolicyLM

    lm = tiny("llama", tok, seed=3)
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    ids, mask = prompts(tok)
    cfg = SamplingConfig(
        max_new_tokens=12, temperature=temperature, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    if sampler == "fast":
        r = FastDecoder(lm, batch=3, max_len=ids.shape[1] + 12, dtype=torch.float32).sample(ids, mask, cfg)
    else:
        r = HFSampler(lm, rt.autocast).sample(ids, mask, cfg)
    assert r.logprobs is not None and r.logprobs.shape == r.completion_ids.shape
    seq = sequences(r)
    with torch.no_grad():
        lp, _ = PolicyLM(lm, rt)(
            seq["input_ids"],
            seq["targets"],
            seq["attention_mask"],
            seq["position_ids"],
            temperature=temperature,
            start=int(seq["start"]),
        )
    m = r.completion_mask.bool()
    assert m.sum() > 10 and (r.logprobs[m] < 0).all() and (r.logprobs[~m] == 0).all()
    assert (lp[m] - r.logprobs[m]).abs().max() < 1e-4


def _continue_case(sampler_name, lm, rt, width):
    if sampler_name == "fast":
        return FastDecoder(lm, batch=3, max_len=width, dtype=torch.float32)
    return HFSampler(lm, rt.autocast)


@pytest.mark.parametrize(
    "sampler,arch,extra", [("fast", "llama", {}), ("hf", "llama", {}), ("fast", "mistral", {"sliding_window": 4})]
)
def test_continuing_in_two_calls_samples_what_one_call_does(tok, sampler, arch, extra):
    """The sampler protocol's continue_from (engine/sampling.py; multi-turn episodes build on it), greedy: 8 tokens
    and then 8 more from the same cache are the 16 tokens of one call, with the same log-probs; and tokens
    appended between the calls (an environment's reply; one completion ended on a stop token, so the cache also
    holds the padding written after it) give what one call on the whole text gives."""
    from prefcli.engine.dist import Runtime

    lm = tiny(arch, tok, seed=3, **extra)  # mistral: a window of 4, which the sequences outgrow
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    ids, mask = prompts(tok)
    s = _continue_case(sampler, lm, rt, ids.shape[1] + 48)

    def cfg(n, stop=()):
        return SamplingConfig(max_new_tokens=n, temperature=0, stop_token_ids=list(stop), pad_token_id=tok.pad_token_id)

    one = s.sample(ids, mask, cfg(16))
    first = s.sample(ids, mask, cfg(8))
    second = s.continue_from(first, [[], [], []], cfg(8))
    assert torch.equal(torch.cat([first.completion_ids, second.completion_ids], 1), one.completion_ids)
    assert torch.allclose(torch.cat([first.logprobs, second.logprobs], 1), one.logprobs, atol=1e-5)
    assert second.finish_reasons == ["length"] * 3 and second.prompt_ids.shape[1] == ids.shape[1] + 8

    stop = int(one.completion_ids[0, 2])  # a token the first completion reaches early: it ends there
    first = s.sample(ids, mask, cfg(8, [stop]))
    assert first.finished[0] and first.lengths[0] <= 3 and first.lengths.max() == 8
    reply = [tok(" and the water", add_special_tokens=False)["input_ids"], tok(" light", add_special_tokens=False)["input_ids"], tok(" Amen. And", add_special_tokens=False)["input_ids"]]  # fmt: skip
    if sampler == "fast":
        with pytest.raises(ValueError, match="needs at least one"):
            s.continue_from(first, [[], [], []], cfg(8, [stop]))
        first = s.sample(ids, mask, cfg(8, [stop]))  # (a refused call leaves the cache as it was; sampled again)
    cont = s.continue_from(first, reply, cfg(8, [stop]))
    whole = [
        p[m.bool()].tolist() + c[cm.bool()].tolist() + r
        for p, m, c, cm, r in zip(ids, mask, first.completion_ids, first.completion_mask, reply)
    ]
    w_ids, w_mask = left_pad(whole, tok.pad_token_id, "cpu")
    fresh = s.sample(w_ids, w_mask, cfg(8, [stop]))
    if extra:  # the window binds: one call on the whole text is transformers' own (so the continuation is too)
        want = lm.generate(
            input_ids=w_ids, attention_mask=w_mask, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
            eos_token_id=stop,
        )[:, w_ids.shape[1] :]  # fmt: skip
        assert torch.equal(fresh.completion_ids[:, : want.shape[1]], want)
    assert torch.equal(cont.completion_ids, fresh.completion_ids) and torch.equal(cont.finished, fresh.finished)
    assert torch.allclose(cont.logprobs, fresh.logprobs, atol=1e-5)
    got = [p[m.bool()].tolist() for p, m in zip(cont.prompt_ids, cont.prompt_mask)]
    assert got == whole  # the continuation's prompt is everything before its completion
    with pytest.raises(ValueError, match="cache is gone"):
        s.continue_from(cont, reply, cfg(8))  # a later call took the cache


def test_hf_sampler_samples_as_the_recipe_says_not_as_the_checkpoint(tok):
    """A checkpoint's generation_config (here typical-p 0.3, top_k 3, a repetition penalty) must not change what the
    transformers-generate sampler draws from: its log-probs equal the model's own forward at the recipe's
    settings (the guard's check), and the model keeps its generation_config."""
    from prefcli.engine.dist import Runtime
    from prefcli.engine.guard import compare_rollout
    from prefcli.engine.models import PolicyLM

    lm = tiny("llama", tok, seed=4)
    lm.generation_config.top_k = 3
    lm.generation_config.typical_p = 0.3
    lm.generation_config.repetition_penalty = 3.0
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    ids, mask = prompts(tok)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    r = HFSampler(lm, rt.autocast).sample(ids, mask, cfg)
    trainer, sampler = compare_rollout(PolicyLM(lm, rt), r, cfg, k=3)
    assert sampler.tokens == 24 and sampler.max_abs < 1e-4, sampler
    assert lm.generation_config.typical_p == 0.3 and lm.generation_config.repetition_penalty == 3.0
