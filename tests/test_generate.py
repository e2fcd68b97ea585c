"""Sampling with output control (prefcli.evaluate.generation) and `prefcli generate` in real pipelines.

The tiny random model is steered with a bias on its output logits (a forward hook on lm_head), so
that it *wants* the banned word, the stop string or EOS: every control is tested against a model
that would break it, and each test first shows that without the control the thing does happen."""

import json
import os
import re
import select
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from prefcli.evaluate.control import BannedWordsProcessor, cut_at_stop, token_strings
from prefcli.evaluate.generation import Generator, read_prompts
from prefcli.evaluate.metrics import contains_word
from prefcli.recipe.commands import GenerationSection

from .conftest import ROOT, TINY_INIT, TOKENIZER

CPU = torch.device("cpu")
PROMPTS = ["And the", "Let there be", "In the beginning God", "", "For the LORD is", "Blessed are"]


@pytest.fixture(scope="module")
def lm_tok():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_INIT["config"],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


def ids(tok, *pieces):
    out = []
    for p in pieces:
        t = tok(p, add_special_tokens=False)["input_ids"]
        assert len(t) == 1, (p, t)
        out.append(t[0])
    return out


@contextmanager
def biased(lm, boosts: dict[int, float]):
    """Add a fixed bias to the model's output logits: a model that loves some tokens."""
    bias = torch.zeros(lm.config.vocab_size)
    for i, v in boosts.items():
        bias[i] = v
    h = lm.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        yield
    finally:
        h.remove()


def gen(lm, tok, prompts=PROMPTS, seed=0, **settings):
    torch.manual_seed(seed)
    return Generator(lm, tok, GenerationSection(**settings), CPU).generate(prompts)


def test_banned_word_never_appears_however_it_is_tokenized(lm_tok):
    lm, tok = lm_tok
    # ' light' is one token; 'light', ' Light', ' li'+'ght', ' l'+'ight' are other ways to write it
    pieces = ids(tok, " light", "l", "ight", " L", " l", " li", "ght")
    boosts = dict(zip(pieces, [9.0, 6, 7, 6, 6, 6, 6]))
    prompts = PROMPTS * 2
    with biased(lm, boosts):
        free = gen(lm, tok, prompts, max_new_tokens=12)
        banned = gen(lm, tok, prompts, max_new_tokens=12, ban=["light"])
    assert sum(contains_word(g.completion, "light") for g in free) >= len(prompts) // 2  # it does want the word
    for g in banned:
        assert not re.search(r"(?<!\w)light(?!\w)", g.completion, re.IGNORECASE), g.completion
        assert len(g.token_ids) <= 12


def test_banned_words_rule_by_hand(lm_tok):
    lm, tok = lm_tok
    p = BannedWordsProcessor(
        tok,
        ["dark"],
        prompt_len=0,
        max_new_tokens=10,
        vocab_size=len(tok),
        eos_ids={tok.eos_token_id},
        pad_id=tok.pad_token_id,
    )
    k, dark, darkness, comma = ids(tok, "k", " dark", " darkness", ",")
    banned, boundary = p.banned_for("and the dar", last_step=False)
    assert k not in banned and not boundary  # "dark" could still become "darkn..."
    banned, _ = p.banned_for("and the dar", last_step=True)
    assert k in banned  # ... but not on the last token: the completion would end with "dark"
    banned, boundary = p.banned_for("and the", last_step=False)
    assert dark not in banned and darkness not in banned and not boundary
    banned, boundary = p.banned_for("and the dark", last_step=False)
    assert boundary  # pending: only a word character may follow (", " or EOS would make the word)
    banned, boundary = p.banned_for("and the DARK", last_step=False)
    assert boundary  # any letter case
    banned, boundary = p.banned_for("and the darkness", last_step=False)
    assert not boundary and comma not in banned
    strings = token_strings(tok, len(tok))
    assert strings[dark] == " dark" and strings[tok.eos_token_id] == ""


def test_min_and_max_new_tokens(lm_tok):
    lm, tok = lm_tok
    eos = tok.eos_token_id
    with biased(lm, {eos: 30.0}):  # a model that wants to stop at once
        eager = gen(lm, tok, max_new_tokens=10)
        held = gen(lm, tok, max_new_tokens=10, min_new_tokens=5)
    assert all(g.token_ids == [eos] and g.finish_reason == "eos" for g in eager)
    for g in held:
        assert g.token_ids[-1] == eos and len(g.token_ids) == 6 and g.finish_reason == "eos"  # 5 tokens, then EOS
    for g in gen(lm, tok, max_new_tokens=7):
        assert len(g.token_ids) <= 7 and (g.finish_reason == "length") == (eos not in g.token_ids)


def test_stop_strings_cut_the_completion(lm_tok):
    lm, tok = lm_tok
    with biased(lm, {ids(tok, ",")[0]: 5.0}):
        free = gen(lm, tok, max_new_tokens=16)
        stopped = gen(lm, tok, max_new_tokens=16, stop=[","])
    assert sum("," in g.completion for g in free) >= 4
    assert sum(g.finish_reason == "stop" for g in stopped) >= 4
    for g in stopped:
        assert "," not in g.completion
        if g.finish_reason == "stop":
            assert "," in tok.decode(g.token_ids)  # generation ended on the stop string, which was cut off
    assert cut_at_stop("a, b. c", [".", ","]) == ("a", True)
    assert cut_at_stop("a, b LORD, c", [","], ["LORD"]) == ("a, b LORD", True)


def test_required_keywords_appear_even_when_the_model_wants_to_stop(lm_tok):
    lm, tok = lm_tok
    eos = tok.eos_token_id
    with biased(lm, {eos: 30.0}):
        outs = gen(lm, tok, max_new_tokens=10, require=["LORD", "light"])
    for g in outs:
        assert contains_word(g.completion, "LORD") and contains_word(g.completion, "light"), g.completion
        assert g.missing == [] and g.finish_reason == "eos"
    # with a stop string the model loves: the stop waits for the keyword
    with biased(lm, {ids(tok, ",")[0]: 9.0}):
        outs = gen(lm, tok, max_new_tokens=12, require=["LORD"], stop=[","])
    for g in outs:  # commas before the keyword do not stop it; the first one after it does
        assert contains_word(g.completion, "LORD") and "," not in g.completion.split("LORD", 1)[1], g.completion
    assert sum(g.finish_reason == "stop" for g in outs) >= 2
    # a budget too small is reported, not hidden
    outs = gen(lm, tok, PROMPTS[:2], max_new_tokens=1, require=["LORD", "light"])
    assert all(g.missing for g in outs)


def test_control_code_is_put_first_and_never_generated(lm_tok):
    lm, tok = lm_tok
    code = tok.convert_tokens_to_ids("<|im_start|>")
    with biased(lm, {code: 20.0}):
        outs = gen(lm, tok, max_new_tokens=6, control_code="<|im_start|>")
    for g in outs:
        assert g.prompt_ids[0] == code and code not in g.token_ids and len(g.token_ids) == 6
    chat = gen(lm, tok, PROMPTS[:1], max_new_tokens=2, chat=True)[0]
    assert tok.decode(chat.prompt_ids).startswith("<|im_start|>user\nAnd the<|im_end|>")


def test_batched_left_padded_generation_equals_one_at_a_time(lm_tok):
    lm, tok = lm_tok
    batched = gen(lm, tok, max_new_tokens=8, do_sample=False, batch_size=8)
    single = gen(lm, tok, max_new_tokens=8, do_sample=False, batch_size=1)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_read_prompts_formats_and_errors():
    assert list(read_prompts(["a\n", "\n", "b c\r\n"], "lines", "x")) == [("a", {}), ("b c", {})]
    rows = list(read_prompts(['{"prompt": "p", "id": 7}\n'], "jsonl", "f.jsonl"))
    assert rows == [("p", {"id": 7})]
    from prefcli.errors import DataError

    with pytest.raises(DataError, match=r"f.jsonl:2: not valid JSON"):
        list(read_prompts(['{"prompt": "p"}', "not json"], "jsonl", "f.jsonl"))
    with pytest.raises(DataError, match=r"f.jsonl:1: expected an object with a 'prompt' string"):
        list(read_prompts(['{"text": "p"}'], "jsonl", "f.jsonl"))


# ---------------------------------------------------------------------------------- CLI

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
def test_generate_in_a_real_shell_pipeline(tiny_model_dir, tmp_path):
    consumer = tmp_path / "consume.py"
    consumer.write_text(
        "import json, sys\nrows = [json.loads(l) for l in sys.stdin]\n"
        "print(len(rows), sum(len(r['completion']) > 0 for r in rows), rows[1]['prompt'], rows[0]['id'])\n"
    )
    cmd = (
        f'set -o pipefail; printf \'{{"prompt": "And the", "id": 1}}\\n{{"prompt": "Let there be", "id": 2}}\\n\''
        f" | {sys.executable} -m prefcli generate {tiny_model_dir} --format jsonl --max-new-tokens 8 --min-new-tokens 3"
        f" --ban light --stop . | {sys.executable} {consumer}"
    )
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["2", "2", "Let", "there", "be", "1"]
    assert "generated 2 completions" in res.stderr


@pytest.mark.slow
def test_first_answer_comes_before_the_last_prompt_is_read(tiny_model_dir):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefcli",
            "generate",
            str(tiny_model_dir),
            "--batch-size",
            "1",
            "--max-new-tokens",
            "4",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        proc.stdin.write("And the\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        assert ready, "no answer while the input stayed open"
        first = json.loads(proc.stdout.readline())
        assert first["prompt"] == "And the" and first["index"] == 0
        assert proc.poll() is None  # still waiting for more prompts
        proc.stdin.write("Let there be\n")
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0
        assert json.loads(rest)["prompt"] == "Let there be"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_generate_cli_options_and_bad_input(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from prefcli.cli import app

    def run(*args, input=None):
        r = CliRunner().invoke(app, ["generate", *[str(a) for a in args]], input=input, catch_exceptions=False)
        return r.exit_code, r.stdout, r.stderr

    prompts = tmp_path / "p.txt"
    prompts.write_text("And the\nLet there be\n")
    code, out, err = run(
        tiny_model_dir, "--prompts", prompts, "--max-new-tokens", "5", "--greedy", "--require", "LORD", "-q"
    )
    assert code == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all("LORD" in r["completion"] and r["missing"] == [] for r in rows)
    assert err == ""  # --quiet
    code, out, err = run(tmp_path / "nope")
    assert code == 2 and "no such file or folder" in err and out == ""
    code, out, err = run(tiny_model_dir, "--min-new-tokens", "9", "--max-new-tokens", "4", input="a\n")
    assert code == 2 and "min_new_tokens (9) exceeds max_new_tokens (4)" in err
    code, out, err = run(tiny_model_dir, "--format", "jsonl", "--max-new-tokens", "2", input='{"prompt": "a"}\nnope\n')
    assert code == 2 and "<stdin>:2: not valid JSON" in err
    assert len(out.splitlines()) == 1  # the prompt read before the bad line was still answered


def test_base_checkpoints_without_a_pad_token_and_remote_code(tiny_model_dir, tmp_path):
    """A base checkpoint whose tokenizer has no pad token (GPT-2, Llama 3 and Mistral bases) samples with --pad-token
    (and is evaluated with an eval model entry's pad_token); a folder whose architecture is its own code loads with
    --trust-remote-code, and without it the error names the flag."""
    import shutil

    from typer.testing import CliRunner

    from prefcli.cli import app

    def run(*args):
        r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        return r.exit_code, r.stdout, r.stderr

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = None
    tok.save_pretrained(base)
    prompts = tmp_path / "p.txt"
    prompts.write_text("And the\nLet there be light\n")
    code, out, err = run("generate", base, "-p", prompts, "--max-new-tokens", "3", "--greedy", "-q")
    assert code == 2 and "has no pad token" in err and "--pad-token" in err
    code, out, err = run("generate", base, "-p", prompts, "--max-new-tokens", "3", "--greedy", "-q",
                         "--pad-token", "<|endoftext|>")  # fmt: skip
    assert code == 0, err
    assert [json.loads(x)["tokens"] for x in out.splitlines()] == [3, 3]
    ev = tmp_path / "eval.yaml"
    ev.write_text(
        json.dumps(
            {
                "command": "eval",
                "models": [{"path": str(base), "pad_token": "<|endoftext|>", "attn_implementation": "eager"}],
                "data": {"text": {"path": str(ROOT / "data" / "tiny" / "text_eval.jsonl"), "max_rows": 4}},
                "metrics": ["perplexity"],
            }
        )
    )
    code, out, err = run("eval", ev, "-o", tmp_path / "eval-run", "-q")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["models"]["base"]["perplexity"]["ppl"] > 1

    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(
        model_type="prefcli_custom",
        architectures=["CustomLM"],
        auto_map={"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"},
    )
    (remote / "config.json").write_text(json.dumps(cfg))
    (remote / "modeling_custom.py").write_text(
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n\n\n"
        "class CustomConfig(Qwen2Config):\n    model_type = 'prefcli_custom'\n\n\n"
        "class CustomLM(Qwen2ForCausalLM):\n    config_class = CustomConfig\n"
    )
    code, out, err = run("generate", remote, "-p", prompts, "--max-new-tokens", "2", "-q")
    assert code == 2 and "--trust-remote-code" in err and "model.trust_remote_code" in err
    code, out, err = run("generate", remote, "-p", prompts, "--max-new-tokens", "2", "-q", "--trust-remote-code")
    assert code == 0, err
    assert len(out.splitlines()) == 2
