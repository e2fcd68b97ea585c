"""Loading, column mapping, masking, truncation, packing."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from prefcli.engine.data import (
    IGNORE,
    StepSchedule,
    encode_messages,
    load_rows,
    pack_rows,
    packed_batch,
    pad_batch,
    split_micro,
    tokenize_sft,
)
from prefcli.engine.dist import Runtime
from prefcli.engine.models import PolicyLM
from prefcli.errors import DataError
from prefcli.recipe.sections import DataSource

from .conftest import DATA, TINY_INIT, TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def src(path, **kw):
    return DataSource.model_validate({"path": str(path), **kw})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_load_the_same_rows(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "a.csv"))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for p in ("a.jsonl", "a.csv", "a.parquet", "saved"):
        got = load_rows(src(tmp_path / p))
        assert got.to_list() == rows, p


def test_column_mapping_and_errors(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    ds = load_rows(
        src(tmp_path / "q.jsonl", columns={"prompt": "question", "completion": "answer"}),
        required=["prompt", "completion"],
    )
    assert ds.column_names == ["prompt", "completion"]
    with pytest.raises(DataError, match="maps 'prompt' to column 'query', which is not in the data"):
        load_rows(src(tmp_path / "q.jsonl", columns={"prompt": "query"}))
    with pytest.raises(DataError, match=r"missing column\(s\) prompt"):
        load_rows(src(tmp_path / "q.jsonl"), required=["prompt"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_rows(src(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(DataError, match="could not read file"):
        load_rows(src(tmp_path / "broken.jsonl"))


def test_prompt_is_masked_and_eos_appended(tok, tmp_path):
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "And God said,", "completion": " Let there be light"}])
    ds = load_rows(src(tmp_path / "pc.jsonl"))
    s = tokenize_sft(ds, tok, "prompt_completion", 64, mask_prompt=True, add_eos=True, source="x")
    ids, labels = s.input_ids[0], s.labels[0]
    n_prompt = len(tok("And God said,")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == " Let there be light"
    s2 = tokenize_sft(ds, tok, "prompt_completion", 64, mask_prompt=False, add_eos=True, source="x")
    assert s2.labels[0] == s2.input_ids[0]


def test_chat_masking_keeps_only_assistant_turns(tok):
    msgs = [
        {"role": "user", "content": "Say light"},
        {"role": "assistant", "content": "Let there be light"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "And there was light"},
    ]
    ids, labels = encode_messages(tok, msgs, mask_prompt=True)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == "Let there be light<|im_end|>\nAnd there was light<|im_end|>\n"
    assert tok.decode(ids).startswith("<|im_start|>user\nSay light<|im_end|>")


def test_truncation_is_counted_and_unlabelled_rows_dropped(tok, tmp_path):
    long = " ".join(["light"] * 100)
    write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": long, "completion": " x"},
            {"prompt": "a", "completion": long},
            {"prompt": "a", "completion": " b"},
        ],
    )
    s = tokenize_sft(load_rows(src(tmp_path / "t.jsonl")), tok, "prompt_completion", 16, True, True, "x")
    assert s.n_rows == 3 and s.n_truncated == 2 and s.n_dropped == 1 and len(s) == 2
    assert all(len(x) <= 16 for x in s.input_ids)


def test_missing_values_name_the_row(tok, tmp_path):
    write_jsonl(tmp_path / "n.jsonl", [{"text": "ok"}, {"text": None}])
    with pytest.raises(DataError, match="row 2 has an empty or missing 'text'"):
        tokenize_sft(load_rows(src(tmp_path / "n.jsonl")), tok, "text", 16, False, True, "n.jsonl")


def test_padding_and_targets():
    b = pad_batch([[1, 2, 3], [4, 5]], [[IGNORE, 2, 3], [4, 5]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["targets"].tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 1]]


def _tiny_policy(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", vocab_size=len(tok), **TINY_INIT["config"])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return PolicyLM(lm, Runtime(device=torch.device("cpu"), precision="fp32"))


def test_packed_and_unpacked_give_the_same_per_example_losses(tok):
    texts = [json.loads(x)["text"] for x in (DATA / "tiny" / "text.jsonl").read_text().splitlines()[:7]]
    import datasets

    s = tokenize_sft(datasets.Dataset.from_list([{"text": t} for t in texts]), tok, "text", 64, False, True, "x")
    policy = _tiny_policy(tok)
    alone = []
    with torch.no_grad():
        for ids, lab in zip(s.input_ids, s.labels):
            b = pad_batch([ids], [lab], tok.pad_token_id)
            alone.append(policy(b["input_ids"], b["targets"], None, b["position_ids"], mode="ce").item())
        rows = pack_rows(range(len(s)), s, 64)
        assert len(rows) < len(s)  # something was actually packed together
        b = packed_batch(rows, s, tok.pad_token_id, 64)
        lp, _ = policy(b["input_ids"], b["targets"], None, b["position_ids"])
    packed = []
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            n = len(s.input_ids[i])
            packed.append(-lp[r, off : off + n].sum().item())
            off += n
    order = [i for members in rows for i in members]
    for k, i in enumerate(order):
        assert packed[k] == pytest.approx(alone[i], rel=1e-5, abs=1e-5)


def test_padding_does_not_change_logprobs(tok):
    policy = _tiny_policy(tok)
    a = tok("In the beginning God created the heaven")["input_ids"]
    b = tok("Jesus wept")["input_ids"]
    with torch.no_grad():
        single = pad_batch([b], [b], tok.pad_token_id)
        lp1, _ = policy(single["input_ids"], single["targets"], single["attention_mask"], single["position_ids"])
        both = pad_batch([a, b], [a, b], tok.pad_token_id)
        lp2, _ = policy(both["input_ids"], both["targets"], both["attention_mask"], both["position_ids"])
    assert torch.allclose(lp1[0, : len(b)], lp2[1, : len(b)], atol=1e-5)


def test_schedule_is_deterministic_and_covers_every_example():
    s = StepSchedule(n_examples=10, global_batch=4, seed=3)
    assert s.steps(0) == StepSchedule(10, 4, 3).steps(0)
    assert s.steps(0) != s.steps(1)
    assert sorted(i for step in s.steps(1) for i in step) == list(range(10))
    assert s.steps_per_epoch() == 3


def test_split_micro_balances_and_sorts():
    parts = split_micro([10, 11, 12, 13, 14], 2, lengths=[5, 1, 4, 2, 3])
    assert [len(p) for p in parts] == [2, 3]
    assert parts[0] == [11, 13]  # shortest first


def test_bos_is_added_once_to_text_a_chat_template_opened_with_bos():
    """Llama 3 and Gemma templates write BOS themselves and their tokenizers add it too: text rendered with the
    template and then tokenized (what a reward model scores, a pre-rendered 'text' row) starts with one BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from prefcli.engine.data import sft_encoder
    from prefcli.engine.pairs import encode_scored, scored_text
    from prefcli.engine.tokenizer import text_ids

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    p, c = scored_text(tok, "chat", [{"role": "user", "content": "hi"}], "there")
    assert tok(p + c)["input_ids"][:2] == [bos, bos]  # what plain tokenization did
    ids = encode_scored(tok, p + c, 100)[0]
    assert ids[0] == bos and ids[1] != bos
    assert text_ids(tok, "hi")[:1] == [bos] and text_ids(tok, "hi").count(bos) == 1  # plain text: BOS still added
    enc = sft_encoder(tok, "text", 64, mask_prompt=False, add_eos=True)
    assert enc({"text": [p + c]})["input_ids"][0].count(bos) == 1
