"""Tokenizers: every tokenizer prefcli reads is opened here (`open_tokenizer`: the policy's, a reward model's, a
judge's, an encoder's), so that one check refuses a degenerate one; `load_tokenizer` adds what training needs (EOS,
a pad token, the recipe's chat template, checked once); `text_ids` and `chat_ids` turn text and conversations
into token ids (BOS once)."""

from __future__ import annotations

import os

from ..errors import UsageError
from ..recipe.sections import ModelSection
from .models import load_errors, origin, quiet_transformers

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


_PROBE = "In the beginning God created the heaven and the earth."


def open_tokenizer(src: str, revision: str | None = None, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained(src)`, or a bare tokenizer.json file, refusing a degenerate result. Every
    tokenizer prefcli reads comes through here (the policy's, a reward model's, a judge's, an encoder's).

    transformers 5 builds a tokenizer from a model folder's config alone when the folder has no tokenizer files
    (qwen2, gpt2 and others: one token, `<|endoftext|>`, that encodes every text to nothing); the model would then
    train on and generate empty sequences without an error. Such a tokenizer is a UsageError naming the folder."""
    quiet_transformers()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if src.endswith(".json") and os.path.isfile(src):
        tok = PreTrainedTokenizerFast(tokenizer_file=src)
        vocab = tok.get_vocab()
        eos = next((t for t in _EOS_NAMES if t in vocab), None)
        pad = next((t for t in _PAD_NAMES if t in vocab), None)
        if eos:
            tok.eos_token = eos
        if pad:
            tok.pad_token = pad
    else:
        tok = AutoTokenizer.from_pretrained(src, revision=revision, trust_remote_code=trust_remote_code)
    specials = set(tok.all_special_tokens)
    if len(tok) <= len(specials) or not tok(_PROBE, add_special_tokens=False)["input_ids"]:
        shown = ", ".join(sorted(tok.get_vocab())[:4])
        raise UsageError(
            f"the tokenizer from {origin(src)} is empty ({len(tok)} token{'s' if len(tok) != 1 else ''}: {shown}) "
            "and turns every text into no tokens: the folder has no tokenizer files (tokenizer.json, or "
            "vocab.json with merges.txt), so transformers built one from config.json alone. Copy the base "
            "model's tokenizer files into it, or point model.tokenizer at them"
        )
    return tok


def load_tokenizer(m: ModelSection):
    """The tokenizer named by model.tokenizer (or model.path), with a pad token checked or added."""
    src = m.tokenizer or m.path
    try:
        tok = open_tokenizer(src, m.revision, m.trust_remote_code)
    except load_errors() as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in first or "custom code" in first:
            raise UsageError(
                f"could not load the tokenizer from {origin(src)}: it ships its own code ({first}); set "
                "model.trust_remote_code: true (prefcli generate: --trust-remote-code) if you trust it"
            ) from None
        raise UsageError(
            f"could not load the tokenizer from {origin(src)}: {first}; point model.tokenizer (or model.path) at a "
            "tokenizer folder, a tokenizer.json file or a model folder"
        ) from None
    if tok.eos_token is None:
        raise UsageError(
            f"the tokenizer from {origin(src)} has no EOS token; training needs one so that the "
            "model learns to stop. Use a tokenizer folder whose tokenizer_config.json sets eos_token."
        )
    if m.pad_token is not None:
        if m.pad_token == tok.eos_token:
            raise UsageError(f"model.pad_token '{m.pad_token}' is the EOS token; pick a different token")
        if m.pad_token not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": m.pad_token})
        else:
            tok.pad_token = m.pad_token
    if tok.pad_token is None:
        raise UsageError(
            f'the tokenizer from {origin(src)} has no pad token. Add `pad_token: "<|pad|>"` under '
            "`model:` in the recipe (an eval recipe: in the model's entry; prefcli generate: --pad-token): a new "
            "token is added and the embeddings resized; a token of the vocabulary changes no weight."
        )
    if m.chat_template is not None:
        from .chat_templates import TEMPLATES, apply_named_template

        if m.chat_template in TEMPLATES:
            apply_named_template(tok, m.chat_template)
        else:
            tok.chat_template = m.chat_template
    if tok.chat_template:
        check_chat_template(
            tok, "model.chat_template" if m.chat_template is not None else f"the chat template of {origin(src)}"
        )
    return tok


def check_chat_template(tok, where: str) -> None:
    """Render the chat template on a sample conversation once, before any data: a template that is not valid Jinja,
    or that reaches for Python internals (which transformers' sandboxed Jinja refuses with SecurityError), is bad
    input naming the template, not a failure in the middle of tokenization. A template that refuses this sample
    on purpose (raise_exception for a conversation it does not support) is left to the real rows."""
    import jinja2

    sample = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
    try:
        tok.apply_chat_template(sample, tokenize=False)
        tok.apply_chat_template(sample[:1], tokenize=False, add_generation_prompt=True)
    except jinja2.exceptions.SecurityError as e:
        raise UsageError(
            f"{where}: the template tries something Jinja's sandbox forbids ({e}); a chat template may only format "
            "the messages: remove the offending expression"
        ) from None
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UsageError(f"{where}: not a valid Jinja template: {e.message} (template line {e.lineno})") from None
    except jinja2.exceptions.TemplateError:
        pass


def text_ids(tok, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens, BOS once: a text rendered by a chat template that
    writes BOS itself (Llama 3's <|begin_of_text|>, Gemma's <bos>) would otherwise start with two."""
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    bos = tok.bos_token_id
    if (
        bos is not None
        and len(ids) > 1
        and ids[0] == ids[1] == bos
        and tok.bos_token
        and text.startswith(tok.bos_token)
    ):
        ids = ids[1:]
    return ids


def chat_ids(tok, messages, **kw) -> list[int]:
    """Token ids of a conversation rendered by the chat template (transformers 5 returns a dict)."""
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)
