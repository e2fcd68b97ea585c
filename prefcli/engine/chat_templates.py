"""Named chat templates for models that ship none: `model.chat_template: chatml | qwen | llama3 | gemma | phi3 |
zephyr | alpaca`, the way LLaMA-Factory's `template:` names a model family's conversation format.

Each is a Jinja string, rendered by the tokenizer's own `apply_chat_template` exactly as a template from a model's
tokenizer_config.json would be. Where a model family ships its template, the bundled one renders plain
conversations (system, user and assistant turns of text) character for character as the family's does
(tests/test_chat_templates.py checks them against the originals TRL keeps, trl/chat_templates/); tools, images and
reasoning blocks are left out. What differs, and why, is in each entry's `note`.

A template's end-of-turn token becomes the tokenizer's EOS (`stop`; LLaMA-Factory's `replace_eos`): every part of
prefcli stops a completion at the EOS (sampling, RL rollouts, `add_eos`), and a chat model must stop at the end of
its turn. Its special tokens that the tokenizer lacks are added as special tokens (one id each; the model's
embeddings grow to the tokenizer when it is built). Templates whose turns end with the tokenizer's own EOS (zephyr,
alpaca) change nothing but the template.

Written by hand (not taken from a library at run time) because no installed package ships these as a registry:
transformers keeps templates in each model's hub repository, TRL's copies are a test-only dependency here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class ChatTemplate:
    jinja: str
    stop: str | None  # the end-of-turn token made the EOS; None: turns end with the tokenizer's own EOS
    special: tuple[str, ...] = ()  # tokens the template writes that must be single tokens
    source: str = ""  # whose format it is
    note: str = ""  # how it differs from the family's own template, if at all


_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
_QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + _QWEN_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_LLAMA3 = (
    "{%- for message in messages %}"
    "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{%- if loop.first and bos_token is defined and bos_token %}{%- set content = bos_token + content %}{%- endif %}"
    "{{- content }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

_GEMMA = (
    "{%- if bos_token is defined and bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set first_user_prefix = '' %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('gemma: conversation roles must alternate user/assistant/user/assistant/... "
    "(after an optional system message)') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

_PHI3 = (
    "{%- for message in messages %}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_ZEPHYR = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
_ALPACA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '" + _ALPACA_SYSTEM + "\\n\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(
        _CHATML,
        "<|im_end|>",
        ("<|im_start|>", "<|im_end|>"),
        "ChatML (OpenAI; the format of Qwen, Yi, SmolLM...)",
        "no default system message",
    ),
    "qwen": ChatTemplate(
        _QWEN,
        "<|im_end|>",
        ("<|im_start|>", "<|im_end|>"),
        "Qwen2.5 (Qwen/Qwen2.5-*-Instruct)",
        "ChatML with Qwen2.5's default system message when the conversation has none; tool calls left out",
    ),
    "llama3": ChatTemplate(
        _LLAMA3,
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "Llama 3 (meta-llama/Meta-Llama-3-8B-Instruct)",
        "the tokenizer's BOS first, as the original writes it (nothing when the tokenizer has none)",
    ),
    "gemma": ChatTemplate(
        _GEMMA,
        "<end_of_turn>",
        ("<start_of_turn>", "<end_of_turn>"),
        "Gemma, Gemma 2 and Gemma 3 (google/gemma-*-it)",
        "a system message goes before the first user turn's text, as Gemma 3 does (Gemma 1 and 2 refuse one); "
        "text content only; the tokenizer's BOS first (nothing when it has none)",
    ),
    "phi3": ChatTemplate(
        _PHI3,
        "<|end|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "Phi-3 (microsoft/Phi-3-mini-4k-instruct)",
        "without the EOS Phi-3's template writes after the last message: <|end|> ends every turn and is the EOS here",
    ),
    "zephyr": ChatTemplate(
        _ZEPHYR, None, (), "Zephyr (HuggingFaceH4/zephyr-7b-beta)", "each turn ends with the tokenizer's own EOS"
    ),
    "alpaca": ChatTemplate(
        _ALPACA,
        None,
        (),
        "Alpaca (Stanford Alpaca, as LLaMA-Factory's `alpaca` template writes it)",
        "the default system text unless the conversation has one; each answer ends with the tokenizer's EOS",
    ),
}


def apply_named_template(tok, name: str) -> None:
    """Give the tokenizer the named template: its Jinja string, its special tokens (added when missing) and its
    end-of-turn token as EOS. `model.chat_template` names one (validated against `TEMPLATES` by the recipe)."""
    t = TEMPLATES[name]
    tok.chat_template = t.jinja
    vocab = tok.get_vocab()
    new = [s for s in t.special if s not in vocab]
    if new:
        tok.add_tokens(new, special_tokens=True)
    if t.stop is not None and tok.eos_token != t.stop:
        if tok.pad_token == t.stop:
            raise UsageError(
                f"model.chat_template {name}: its end-of-turn token {t.stop} becomes the EOS, but it is the tokenizer's "
                "pad token; set model.pad_token to another token"
            )
        tok.eos_token = t.stop
