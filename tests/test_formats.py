"""Dataset formats people already have (ShareGPT, Alpaca, OpenAI), detected from the columns or named by
data.format, read as prefcli's own chat rows: the bundled chat data written in each format reads back as the same
rows, tokenizes to the same ids and labels, and trains to the same losses. ShareGPT's reading agrees with TRL's
maybe_convert_to_chatml; the speaker names and Alpaca's prompt are LLaMA-Factory's (data/README.md there)."""

from __future__ import annotations

import json

import datasets
import pytest

from prefcli.engine.formats import convert_rows, outside_format
from prefcli.errors import DataError
from prefcli.runner import RunOptions, run_training

from .conftest import DATA, TOKENIZER, losses, sft_recipe_dict
from .test_contrastive import pref_dict

CHAT = [json.loads(x) for x in (DATA / "tiny" / "chat.jsonl").read_text().splitlines()]  # single turns
PAIRS = [json.loads(x) for x in (DATA / "tiny" / "pref_chat.jsonl").read_text().splitlines()]


def sharegpt(row: dict) -> dict:
    who = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": who[m["role"]], "value": m["content"]} for m in row["messages"]]}


def alpaca(row: dict) -> dict:
    user, answer = row["messages"]
    return {"instruction": user["content"], "input": "", "output": answer["content"]}


def sharegpt_pair(row: dict) -> dict:
    return {
        "conversations": [{"from": "human", "value": m["content"]} for m in row["prompt"]],
        "chosen": {"from": "gpt", "value": row["chosen"][0]["content"]},
        "rejected": {"from": "gpt", "value": row["rejected"][0]["content"]},
    }


def alpaca_pair(row: dict) -> dict:
    return {"instruction": row["prompt"][0]["content"], "input": "", "chosen": row["chosen"][0]["content"],
            "rejected": row["rejected"][0]["content"]}  # fmt: skip


def openai_pair(row: dict) -> dict:
    return {"input": {"messages": row["prompt"]}, "preferred_output": row["chosen"],
            "non_preferred_output": row["rejected"]}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(rows: list[dict], requested: str, kind: str):
    ds = datasets.Dataset.from_list(rows)
    fmt = outside_format(ds.column_names, requested, kind)
    return fmt, (convert_rows(ds, fmt, kind, "rows.jsonl", "data.train") if fmt else ds)


@pytest.mark.parametrize("make,name", [(sharegpt, "sharegpt"), (alpaca, "alpaca")])
def test_sft_rows_of_each_format_read_back_as_the_same_chat_rows(make, name):
    from transformers import AutoTokenizer

    from prefcli.engine.data import tokenize_sft

    fmt, ds = read([make(r) for r in CHAT], "auto", "sft")
    assert fmt == name and ds.column_names == ["messages"]
    assert ds.to_list() == CHAT
    assert read([make(r) for r in CHAT], name, "sft")[0] == name  # named, as detected
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    a = tokenize_sft(ds, tok, "messages", 64, True, True, "x")
    b = tokenize_sft(datasets.Dataset.from_list(CHAT), tok, "messages", 64, True, True, "x")
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


@pytest.mark.parametrize("make,name", [(sharegpt_pair, "sharegpt"), (alpaca_pair, "alpaca"), (openai_pair, "openai")])
def test_pairs_of_each_format_read_back_as_the_same_chat_pairs(make, name):
    fmt, ds = read([make(r) for r in PAIRS], "auto", "pairs")
    assert fmt == name and ds.to_list() == PAIRS


def test_sharegpt_agrees_with_trl_and_llama_factory_and_alpaca_joins_its_fields_as_llama_factory_does():
    from trl import maybe_convert_to_chatml

    row = {"system": "Be brief.", "conversations": [
        {"from": "user", "value": "Who made the light?"}, {"from": "assistant", "value": "God."},
        {"from": "user", "value": "When?"}, {"from": "assistant", "value": "On the first day."}]}  # fmt: skip
    _, ds = read([row], "sharegpt", "sft")
    trl_row = maybe_convert_to_chatml(json.loads(json.dumps({"conversations": row["conversations"]})))
    assert ds[0]["messages"] == [{"role": "system", "content": "Be brief."}] + trl_row["messages"]
    human = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    assert read([human], "auto", "sft")[1][0]["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]  # fmt: skip
    row = {"system": "Answer in one word.", "history": [["Who made the light?", "God."]],
           "instruction": "Name the first day's work.", "input": "Genesis 1", "output": "Light."}  # fmt: skip
    assert read([row], "auto", "sft")[1][0]["messages"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Who made the light?"}, {"role": "assistant", "content": "God."},
        {"role": "user", "content": "Name the first day's work.\nGenesis 1"}, {"role": "assistant", "content": "Light."},
    ]  # fmt: skip


def test_a_row_that_does_not_fit_its_format_is_named():
    bad = [sharegpt(CHAT[0]), {"conversations": [{"from": "bot", "value": "x"}]}]
    with pytest.raises(DataError, match=r"rows.jsonl: row 2 \(sharegpt\): 'conversations\[0\].from' is 'bot'"):
        read(bad, "auto", "sft")
    with pytest.raises(DataError, match=r"format 'alpaca' needs column\(s\) instruction, output"):
        read(CHAT, "alpaca", "sft")
    bad = [openai_pair(PAIRS[0]), {**openai_pair(PAIRS[1]), "input": {"messages": []}}]
    with pytest.raises(DataError, match=r"row 2 \(openai\): 'input.messages' is an empty list, expected a list"):
        read(bad, "auto", "pairs")


def test_openai_messages_with_weight_0_leave_that_answer_untrained():
    from transformers import AutoTokenizer

    from prefcli.engine.data import IGNORE, encode_messages

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    msgs = [{"role": "user", "content": "Who?", "weight": None}, {"role": "assistant", "content": "God.", "weight": 0},
            {"role": "user", "content": "When?", "weight": None},
            {"role": "assistant", "content": "The first day.", "weight": 1}]  # fmt: skip
    ids, labels = encode_messages(tok, msgs, mask_prompt=True)
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE]) == "The first day.<|im_end|>\n"


@pytest.mark.slow
def test_training_on_each_format_is_training_on_the_chat_rows(tmp_path, write_recipe):
    """The same rows in another format train to the same per-step losses, and the summary says what was read."""
    d = sft_recipe_dict(train={"max_steps": 3}, output={"plot": False})
    d["data"] = {"train": {"path": str(DATA / "tiny" / "chat.jsonl"), "max_rows": 32}, "max_length": 64}
    base = tmp_path / "chat"
    run_training("sft", write_recipe(d, "a.yaml"), RunOptions(output_dir=str(base), quiet=True))
    d["data"]["train"]["path"] = str(write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt(r) for r in CHAT]))
    s = run_training("sft", write_recipe(d, "b.yaml"), RunOptions(output_dir=str(tmp_path / "sg"), quiet=True))
    assert s["data"]["read_as"] == "sharegpt" and s["data"]["format"] == "messages"
    assert losses(tmp_path / "sg") == losses(base)

    p = pref_dict("dpo", train={"max_steps": 3})
    p["data"].update(train={"path": str(DATA / "tiny" / "pref_chat.jsonl")}, eval=None)
    run_training("contrastive", write_recipe(p, "c.yaml"), RunOptions(output_dir=str(tmp_path / "pc"), quiet=True))
    p["data"]["train"]["path"] = str(write_jsonl(tmp_path / "openai.jsonl", [openai_pair(r) for r in PAIRS]))
    p["data"]["format"] = "openai"
    s = run_training("contrastive", write_recipe(p, "d.yaml"), RunOptions(output_dir=str(tmp_path / "po"), quiet=True))
    assert s["data"]["read_as"] == "openai" and s["data"]["format"] == "chat"
    assert losses(tmp_path / "po", "loss/dpo") == losses(tmp_path / "pc", "loss/dpo")
    # a reward model from Alpaca pairs (detected)
    p.update(command="reward", reward={"objective": "bradley_terry"}, train={"max_steps": 1})
    p.pop("contrastive")
    p["data"].update(
        format="auto", train={"path": str(write_jsonl(tmp_path / "al.jsonl", [alpaca_pair(r) for r in PAIRS]))}
    )
    s = run_training("reward", write_recipe(p, "e.yaml"), RunOptions(output_dir=str(tmp_path / "rw"), quiet=True))
    assert s["data"]["read_as"] == "alpaca" and s["data"]["format"] == "chat" and s["data"]["train_examples"] == 48


def test_data_inspect_reads_each_format_as_training_does(tmp_path, cli):
    from .conftest import last_json

    for rows, kind, fmt, name in (
        ([sharegpt_pair(r) for r in PAIRS], "pairs", "chat", "sharegpt"),
        ([openai_pair(r) for r in PAIRS], "pairs", "chat", "openai"),
        ([alpaca(r) for r in CHAT], "sft", "messages", "alpaca"),
    ):
        f = write_jsonl(tmp_path / f"{name}-{kind}.jsonl", rows)
        code, out, err = cli("data", "inspect", f, "--tokenizer", TOKENIZER, "-q")
        s = last_json(out)
        assert code == 0 and (s["kind"], s["format"], s["read_as"]) == (kind, fmt, name), err
        assert s["train"]["rows"] == len(rows)
