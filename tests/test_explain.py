"""`prefcli explain`: attribution on a task whose answer is known, the implicit reward against what
DPO training logs, the HTML page (structure here; rendering in headless Chromium when present),
attention maps, and bad input."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
import yaml

from prefcli.runner import RunOptions, run_training

from .conftest import TINY_INIT, TOKENIZER, last_json, read_metrics, sft_recipe_dict

FILLER = "house people water city day children went came field land king river stone bread gold".split()


def phrase_pairs(n: int, seed: int) -> list[dict]:
    """Pairs that differ in one phrase only: ' great joy' (chosen) or ' bitter sorrow' (rejected),
    at a random place among random filler words shared by both answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pre = " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 6)))
        post = " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": "", "chosen": f" {pre} great joy {post}", "rejected": f" {pre} bitter sorrow {post}"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def phrase_rm(tmp_path_factory):
    """A tiny reward model trained (in process, ~10 s) on the one-phrase pairs. Reward centering keeps
    r(chosen) + r(rejected) near 0: Bradley-Terry alone leaves the level of the shared filler free, so
    a text could score high or low before its phrase counts, and the attributions against a neutral
    baseline would carry that arbitrary level too."""
    import yaml

    d = tmp_path_factory.mktemp("phrase-rm")
    train = write_jsonl(d / "train.jsonl", phrase_pairs(256, 0))
    held = write_jsonl(d / "eval.jsonl", phrase_pairs(6, 1))
    r = {
        "command": "reward",
        "model": {"init": TINY_INIT, "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(train)}, "eval": {"path": str(held)}, "max_length": 32},
        "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3, "seed": 0, "eval_every_steps": 20},
        "reward": {"center_rewards_coefficient": 0.05},
        "output": {"plot": False},
    }
    (d / "r.yaml").write_text(yaml.safe_dump(r))
    s = run_training("reward", d / "r.yaml", RunOptions(output_dir=str(d / "run"), quiet=True))
    assert s["final"]["eval/accuracy"] == 1.0
    return d / "run" / "final", held


def explain_rows(out: str) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in out.strip().splitlines()]
    return lines[:-1], lines[-1]


# --------------------------------------------------------------------------- the known answer


@pytest.mark.slow
def test_attribution_concentrates_on_the_phrase_that_decides(phrase_rm, cli, tmp_path):
    model, held = phrase_rm
    page = tmp_path / "page.html"
    code, out, err = cli("explain", model, "--pairs", held, "--html", page)
    assert code == 0, err
    rows, s = explain_rows(out)
    assert s["command"] == "explain" and s["status"] == "completed" and s["method"] == "ig"
    assert s["model_kind"] == "reward" and not s["warnings"]
    phrase = {" great", " joy", " bitter", " sorrow"}
    masses = []
    for item in s["items"]:
        k = item["item"]
        mine = [r for r in rows if r["item"] == k]
        # the differing tokens are exactly the phrase; the filler is shared
        assert {r["token"] for r in mine if not r["shared"]} == phrase
        # the biggest contribution to the margin, over both answers, is a phrase token
        top = max(mine, key=lambda r: abs(r["score"]))
        assert top["token"] in phrase
        # on each answer, the phrase holds most of the attribution mass, though it is 2 of its 8-14 tokens
        for side in ("chosen", "rejected"):
            toks = [r for r in mine if r["side"] == side]
            on_phrase = sum(abs(r["score"]) for r in toks if r["token"] in phrase)
            assert on_phrase / sum(abs(r["score"]) for r in toks) > 0.5 and 2 / len(toks) <= 0.25
        # completeness of integrated gradients: the attributions sum to score - baseline score
        for side in ("chosen", "rejected"):
            info = item[side]
            gap = info["score"] - info["baseline_score"]
            assert info["attribution_sum"] == pytest.approx(gap, abs=0.01 * abs(gap))
            assert info["convergence_delta"] == pytest.approx(info["attribution_sum"] - gap, abs=1e-4)
        assert item["margin"] == pytest.approx(item["chosen"]["score"] - item["rejected"]["score"])
        masses.append(item["differing_mass"])
    assert min(masses) > 0.6 and sum(masses) / len(masses) > 0.7
    assert "pair 0 (row 1): margin" in err  # the coloured report on stderr
    assert page.exists()


def test_prefix_scores_are_the_scores_of_every_prefix(phrase_rm, cli):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefcli.analysis.explain import position_scores

    model_dir, _ = phrase_rm
    text = " city went great joy house bread"
    code, out, err = cli("explain", model_dir, "--text", text, "--method", "prefix", "-q")
    assert code == 0, err
    rows, s = explain_rows(out)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = tok(text)["input_ids"]
    with torch.no_grad():  # each prefix scored on its own, as a reward model scores a text
        direct = [float(model(input_ids=torch.tensor([ids[: t + 1]])).logits[0, 0]) for t in range(len(ids))]
    assert position_scores(model, torch.tensor([ids])) == pytest.approx(direct, abs=1e-5)
    diffs = [direct[0]] + [direct[t] - direct[t - 1] for t in range(1, len(ids))]
    assert [r["score"] for r in rows] == pytest.approx(diffs, abs=1e-5)
    assert s["items"][0]["text"]["score"] == pytest.approx(direct[-1], abs=1e-5)
    assert sum(r["score"] for r in rows) == pytest.approx(direct[-1], abs=1e-5)


# ------------------------------------------------------------------------------------ HTML


class Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self.tags, self._open = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self._open = {**a, "text": ""}

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(self._open)
            self._open = None


def test_html_page_is_self_contained_with_one_coloured_span_per_token(phrase_rm, cli, tmp_path):
    model, held = phrase_rm
    page = tmp_path / "p.html"
    code, out, err = cli("explain", model, "--pairs", held, "--max-rows", 2, "--steps", 8, "--html", page, "-q")
    assert code == 0, err
    rows, s = explain_rows(out)
    html = page.read_text()
    assert s["html"] == str(page) and html.startswith("<!DOCTYPE html>")
    p = Spans()
    p.feed(html)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert "http://" not in html and "https://" not in html and "<style>" in html  # inline CSS, nothing fetched
    assert len(p.spans) == len(rows)
    # the rejected answers' values are sign-flipped, and the page says so where they are shown (2 pairs)
    assert html.count("<th>to the margin (&minus;score)</th>") == 2 and html.count("<th>score</th>") == 2
    assert html.count("The token scores of this answer are sign-flipped") == 2
    for span, row in zip(p.spans, rows):
        assert span["text"] == row["token"]
        assert float(span["data-score"]) == pytest.approx(row["score"], rel=1e-4, abs=1e-9)
        colour = span.get("style", "")
        if row["score"] > 0:
            assert "rgba(40,160,60," in colour  # green raises the score (favours chosen)
        elif row["score"] < 0:
            assert "rgba(210,40,40," in colour
        assert ("diff" in span["class"].split()) == (not row["shared"])


@pytest.mark.slow
def test_html_renders_in_headless_chromium(phrase_rm, cli, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip(
            "no Chromium on this machine (Debian: apt-get install chromium); the HTML structure is tested above"
        )
    model, held = phrase_rm
    page = tmp_path / "p.html"
    code, out, err = cli("explain", model, "--pairs", held, "--max-rows", 1, "--steps", 8, "--html", page, "-q")
    assert code == 0, err
    shot = tmp_path / "shot.png"
    res = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1000,700",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists(), res.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 700)
    px = list(img.getdata())
    greenish = sum(1 for r, g, b in px if g > r + 40 and g > b + 40)
    reddish = sum(1 for r, g, b in px if r > g + 60 and r > b + 60)
    assert greenish > 500 and reddish > 100  # coloured token backgrounds (and the legend) were drawn


# -------------------------------------------------------------------------------- attention


def test_attention_maps_and_layer_head_checks(phrase_rm, cli, tmp_path):
    model, _ = phrase_rm
    code, out, err = cli("explain", model, "--text", " city great joy", "--method", "prefix", "--plots", tmp_path / "p", "--layer", 1, "--head", 3, "-q")  # fmt: skip
    assert code == 0, err
    s = last_json(out)
    assert sorted(p.split("/")[-1] for p in s["plots"]) == ["attention-item0-text.png", "tokens-item0-text.png"]
    assert all(
        (tmp_path / "p" / n).stat().st_size > 1000 for n in ("attention-item0-text.png", "tokens-item0-text.png")
    )
    from prefcli.analysis.explain import attention_map
    from prefcli.analysis.explain.inputs import load_reward_model

    m, tok = load_reward_model(str(model), torch.device("cpu"), eager=True)
    a = attention_map(m, torch.tensor([tok(" city great joy")["input_ids"]]), None, None)
    assert a.shape == (3, 3) and a.sum(1) == pytest.approx([1, 1, 1], abs=1e-5)  # rows of attention sum to 1
    assert a[0, 1] == a[0, 2] == 0  # causal: the first token sees only itself
    code, out, err = cli("explain", model, "--text", "x", "--plots", tmp_path / "p", "--layer", 2)
    assert code == 2 and "--layer 2 is out of range: the model has 2 layers (0 to 1)" in last_json(out)["error"]
    code, out, err = cli("explain", model, "--text", "x", "--plots", tmp_path / "p", "--head", 4)
    assert code == 2 and "--head 4 is out of range: the model has 4 attention heads" in last_json(out)["error"]
    code, out, err = cli("explain", model, "--text", "x", "--layer", 0)
    assert code == 2 and "give --plots DIR" in last_json(out)["error"]


# ------------------------------------------------------------------------- implicit reward


@pytest.mark.slow
def test_implicit_reward_sums_to_what_dpo_training_logs(tmp_path, tiny_model_dir, write_recipe, cli):
    from .test_contrastive import pref_dict

    d = pref_dict(
        "dpo",
        model={"init": None, "path": str(tiny_model_dir), "tokenizer": None},
        train={"max_steps": 6, "eval_every_steps": 6},
    )
    d["data"]["eval"]["max_rows"] = 6
    run = tmp_path / "dpo"
    s = run_training("contrastive", write_recipe(d), RunOptions(output_dir=str(run), quiet=True))
    logged = [m for m in read_metrics(run) if "eval/reward_chosen" in m][-1]
    assert logged["step"] == 6 and abs(logged["eval/reward_chosen"]) > 1e-4  # the policy moved
    # no --reference, no --beta: both come from the run's recipe.yaml (model.path, beta 0.1)
    code, out, err = cli("explain", run / "final", "--pairs", d["data"]["eval"]["path"], "--max-rows", 6)
    assert code == 0, err
    rows, s = explain_rows(out)
    assert s["method"] == "implicit" and s["beta"] == 0.1 and s["reference"] == str(tiny_model_dir)
    chosen = []
    for item in s["items"]:
        c = item["chosen"]
        toks = [
            r["score"] for r in rows if r["item"] == item["item"] and r["side"] == "chosen" and r["score"] is not None
        ]
        assert sum(toks) == pytest.approx(c["implicit_reward"], abs=1e-5)  # the tokens add up to the sequence
        assert c["implicit_reward"] == pytest.approx(0.1 * (c["logp"] - c["ref_logp"]), abs=1e-6)
        assert all(r["score"] is None for r in rows if r["item"] == item["item"] and r["prompt"])
        chosen.append(c["implicit_reward"])
    assert sum(chosen) / len(chosen) == pytest.approx(logged["eval/reward_chosen"], abs=1e-4)
    rej = [it["rejected"]["implicit_reward"] for it in s["items"]]
    assert sum(rej) / len(rej) == pytest.approx(logged["eval/reward_rejected"], abs=1e-4)


# ------------------------------------------------------------------------------- bad input


def test_bad_input_exits_2_naming_the_problem(phrase_rm, tiny_model_dir, cli, tmp_path, monkeypatch):
    model, held = phrase_rm
    code, out, err = cli("explain", tiny_model_dir, "--text", "x", "--method", "ig")
    s = last_json(out)
    assert code == 2 and s["status"] == "invalid" and s["command"] == "explain"
    assert "is not a reward model: it is a causal language model" in s["error"]
    code, out, err = cli("explain", model, "--text", "x", "--method", "implicit")
    assert code == 2 and "is a reward model; the implicit reward" in last_json(out)["error"]
    code, out, err = cli("explain", tiny_model_dir, "--text", "x")
    assert code == 2 and "needs its reference" in last_json(out)["error"] and "--reference" in last_json(out)["error"]
    # a policy trained from model.init: its run's recipe.yaml is found, and says why there is no reference
    run = tmp_path / "init-run"
    run.mkdir()
    (run / "final").symlink_to(tiny_model_dir)
    (run / "recipe.yaml").write_text(yaml.safe_dump(sft_recipe_dict()))
    code, out, err = cli("explain", run / "final", "--text", "x")
    e = last_json(out)["error"]
    assert code == 2 and f"the run's recipe ({run / 'recipe.yaml'}) started it from a random initialisation" in e
    assert "(model.init: qwen2)" in e and "--reference MODEL_FOLDER" in e and "no run recipe.yaml" not in e
    code, out, err = cli("explain", model, "--text", " house" * 300)
    assert code == 2 and "300 tokens, longer than the model's context of 256 tokens" in last_json(out)["error"]
    code, out, err = cli(
        "explain", tiny_model_dir, "--reference", tiny_model_dir, "--prompt", "A", "--text", " house" * 300
    )
    assert code == 2 and "longer than the model's context of 256 tokens" in last_json(out)["error"]
    code, out, err = cli("explain", model)
    assert code == 2 and "nothing to explain" in last_json(out)["error"]
    code, out, err = cli("explain", tmp_path, "--text", "x")
    assert code == 2 and "not a model folder" in last_json(out)["error"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"a": 1}])
    code, out, err = cli("explain", model, "--pairs", bad)
    assert code == 2 and "missing column(s) chosen, rejected" in last_json(out)["error"]
    # captum is an optional extra: its absence is named, and the prefix method still works
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    code, out, err = cli("explain", model, "--text", " great joy")
    assert code == 2 and "pip install 'prefcli[explain]'" in last_json(out)["error"]
    code, out, err = cli("explain", model, "--text", " great joy", "--method", "prefix", "-q")
    assert code == 0
