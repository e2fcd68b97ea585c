"""Named chat templates (`model.chat_template: chatml | qwen | llama3 | gemma | phi3 | zephyr | alpaca`): each renders
a hand-written expected string through transformers' apply_chat_template, and where a model family ships its
template (TRL keeps the originals, trl/chat_templates/) it renders plain conversations exactly as the original does.
A named template's end-of-turn token becomes the EOS, its special tokens single tokens; training masks put labels on
the assistant turns and their end-of-turn token only."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefcli.engine.chat_templates import TEMPLATES, apply_named_template

from .conftest import TOKENIZER

SYS = {"role": "system", "content": "Be brief."}
CHAT = [
    {"role": "user", "content": "Who made the light?"},
    {"role": "assistant", "content": "God made it."},
    {"role": "user", "content": "When?"},
    {"role": "assistant", "content": " On the first day. "},
]


def tokenizer(name: str | None = None, bos: str | None = "<s>"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if bos is not None:
        tok.add_tokens([bos], special_tokens=True)
        tok.bos_token = bos
    if name is not None:
        apply_named_template(tok, name)
    return tok


def render(tok, messages, gen: bool = False, template: str | None = None) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=template)


# the end of the conversation, and the generation prompt after its first user turn, by hand
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho made the light?<|im_end|>\n"
        "<|im_start|>assistant\nGod made it.<|im_end|>\n<|im_start|>user\nWhen?<|im_end|>\n"
        "<|im_start|>assistant\n On the first day. <|im_end|>\n",
        "<|im_start|>user\nWho made the light?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "qwen": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho made the light?<|im_end|>\n"
        "<|im_start|>assistant\nGod made it.<|im_end|>\n<|im_start|>user\nWhen?<|im_end|>\n"
        "<|im_start|>assistant\n On the first day. <|im_end|>\n",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWho made the light?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho made the light?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nGod made it.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhen?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nOn the first day.<|eot_id|>",
        "<s><|start_header_id|>user<|end_header_id|>\n\nWho made the light?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma": (
        "<s><start_of_turn>user\nBe brief.\n\nWho made the light?<end_of_turn>\n"
        "<start_of_turn>model\nGod made it.<end_of_turn>\n<start_of_turn>user\nWhen?<end_of_turn>\n"
        "<start_of_turn>model\nOn the first day.<end_of_turn>\n",
        "<s><start_of_turn>user\nWho made the light?<end_of_turn>\n<start_of_turn>model\n",
    ),
    "phi3": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWho made the light?<|end|>\n<|assistant|>\nGod made it.<|end|>\n"
        "<|user|>\nWhen?<|end|>\n<|assistant|>\n On the first day. <|end|>\n",
        "<|user|>\nWho made the light?<|end|>\n<|assistant|>\n",
    ),
    "zephyr": (
        "<|system|>\nBe brief.<|im_end|>\n<|user|>\nWho made the light?<|im_end|>\n<|assistant|>\nGod made it.<|im_end|>\n"
        "<|user|>\nWhen?<|im_end|>\n<|assistant|>\n On the first day. <|im_end|>\n",
        "<|user|>\nWho made the light?<|im_end|>\n<|assistant|>\n",
    ),
    "alpaca": (
        "Be brief.\n\n### Instruction:\nWho made the light?\n\n### Response:\nGod made it.<|im_end|>\n\n"
        "### Instruction:\nWhen?\n\n### Response:\n On the first day. <|im_end|>\n\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWho made the light?\n\n### Response:\n",
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_named_template_renders_what_was_worked_out_by_hand(name):
    tok = tokenizer(name)
    whole, prompt = EXPECTED[name]
    assert render(tok, [SYS, *CHAT]) == whole
    assert render(tok, CHAT[:1], gen=True) == prompt
    t = TEMPLATES[name]
    if t.stop is not None:  # the end-of-turn token is the EOS, every special token one token
        assert tok.eos_token == t.stop
    else:
        assert tok.eos_token == "<|im_end|>"  # the tokenizer's own
    for s in t.special:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1, s


def trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


# bundled name -> (TRL's copy of the family's original, conversations it is compared on)
ORIGINALS = {
    "llama3": ("llama3", "all"),
    "qwen": ("qwen2_5", "all"),
    "gemma": ("gemma", "no system"),  # Gemma 1/2 refuse a system message
    "gemma3": ("gemma3", "all"),  # ... Gemma 3 takes it as the bundled gemma does
    "chatml": ("qwen2_5", "with system"),  # Qwen2.5 is ChatML plus a default system message
    "phi3": ("phi3", "generation prompt"),  # the original writes an EOS after the last message
}


@pytest.mark.parametrize("original", sorted(ORIGINALS))
def test_the_bundled_templates_render_as_the_families_own(original):
    trl_name, which = ORIGINALS[original]
    name = "gemma" if original == "gemma3" else original
    tok = tokenizer(name)
    theirs = trl_template(trl_name)
    convs = {
        "with system": [[SYS, *CHAT], [SYS, *CHAT[:1]], [SYS, *CHAT[:3]]],
        "no system": [CHAT, CHAT[:1], CHAT[:3]],
    }
    chosen = {
        "all": convs["with system"] + convs["no system"],
        "with system": convs["with system"],
        "no system": convs["no system"],
        "generation prompt": convs["with system"] + convs["no system"],
    }[which]
    n = 0
    for conv in chosen:
        gens = (True,) if which == "generation prompt" or conv[-1]["role"] == "user" else (False,)
        for gen in gens:
            assert render(tok, conv, gen) == render(tok, conv, gen, template=theirs), (conv, gen)
            n += 1
    assert n >= 3
    if original == "phi3":  # the one difference, and why: <|end|> is the EOS here, so nothing follows the last turn
        ours, orig = render(tok, CHAT), render(tok, CHAT, template=theirs)
        assert orig == ours + tok.eos_token


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_training_labels_are_the_assistant_turns_and_their_end_of_turn_token(name):
    """encode_messages masks by prefix rendering: each named template renders a conversation's beginning as a
    prefix of the whole (the generation prompt included), so the labels are exactly the assistant answers."""
    from prefcli.engine.data import IGNORE, encode_messages

    tok = tokenizer(name)
    ids, labels = encode_messages(tok, [SYS, *CHAT], mask_prompt=True)
    assert len(ids) == len(labels)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    stop = tok.eos_token
    answers = {
        "chatml": f"God made it.{stop}\n On the first day. {stop}\n",
        "qwen": f"God made it.{stop}\n On the first day. {stop}\n",
        "llama3": f"God made it.{stop}On the first day.{stop}",
        "gemma": f"God made it.{stop}\nOn the first day.{stop}\n",
        "phi3": f"God made it.{stop}\n On the first day. {stop}\n",
        "zephyr": f"God made it.{stop}\n On the first day. {stop}\n",
        "alpaca": f"God made it.{stop}\n\n On the first day. {stop}\n\n",
    }
    assert trained == answers[name]
    assert all(
        lab == IGNORE
        for lab in labels[
            : len(tok.apply_chat_template([SYS, CHAT[0]], tokenize=True, add_generation_prompt=True)["input_ids"])
        ]
    )


def test_a_run_with_a_named_template_saves_it_with_its_eos_and_tokens(tmp_path, write_recipe):
    """sft on chat rows with model.chat_template: llama3 on a tokenizer that has none of its tokens: the model
    grows to the tokenizer, and final/ carries the template, the end-of-turn EOS and the new tokens."""
    from transformers import AutoConfig, AutoTokenizer

    from prefcli.runner import RunOptions, run_training

    from .conftest import DATA, sft_recipe_dict

    d = sft_recipe_dict(train={"max_steps": 2}, output={"plot": False})
    d["model"]["chat_template"] = "llama3"
    d["data"] = {"train": {"path": str(DATA / "tiny" / "chat.jsonl"), "max_rows": 16}, "max_length": 64}
    s = run_training("sft", write_recipe(d), RunOptions(output_dir=str(tmp_path / "run"), quiet=True))
    assert s["status"] == "completed" and s["data"]["format"] == "messages"
    final = tmp_path / "run" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    cfg = AutoConfig.from_pretrained(final)
    assert tok.chat_template == TEMPLATES["llama3"].jinja and tok.eos_token == "<|eot_id|>" and len(tok) == 4099
    assert cfg.vocab_size >= 4099 and cfg.eos_token_id == tok.convert_tokens_to_ids("<|eot_id|>")


@pytest.mark.parametrize("name", ["llama3", "gemma"])
def test_templates_that_write_the_bos_write_nothing_for_a_tokenizer_without_one(name):
    tok = tokenizer(name, bos=None)
    assert tok.bos_token is None
    assert render(tok, CHAT[:1], gen=True) == EXPECTED[name][1].removeprefix("<s>")
