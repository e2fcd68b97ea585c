"""Train the bundled byte-level BPE tokenizer on the KJV training split.

    python scripts/train_tokenizer.py      # writes data/tokenizer/ (loads with AutoTokenizer)

Byte-level, so any UTF-8 text encodes without unknown tokens. Special tokens: <|endoftext|>
(end of text), <|pad|> (padding, distinct from EOS), <|im_start|> / <|im_end|> (chat turns; the
chat template ends each turn with <|im_end|>, which is also the EOS token so generation stops at
the end of a turn).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--data", default=str(ROOT / "data" / "kjv" / "train.jsonl.gz"))
    ap.add_argument("--out", default=str(ROOT / "data" / "tokenizer"))
    a = ap.parse_args()

    def texts():
        with gzip.open(a.data, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=a.vocab_size,
        special_tokens=SPECIALS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    Path(a.out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(a.out)
    print(f"vocab {len(fast)} -> {a.out}")


if __name__ == "__main__":
    main()
