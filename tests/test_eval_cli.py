"""`prefcli eval` end to end through the CLI on tiny models: the summary on stdout, examples.jsonl,
the committed tiny recipe, and bad input."""

import json
import math

import pytest
import torch

from prefcli.evaluate import metrics as M

from .conftest import DATA, ROOT, TINY_INIT, TOKENIZER, last_json

PAIRS = [
    {
        "prompt": "And God said,",
        "chosen": " Let there be light: and there was light.",
        "rejected": " Let there be dark.",
    },
    {"prompt": "The LORD is", "chosen": " my shepherd; I shall not want, in the light.", "rejected": " a rock."},
    {"prompt": "Blessed are", "chosen": " the meek: for they shall see light.", "rejected": " the proud."},
]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny random reward model (sequence classification, one label) with the bundled tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-rm")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tok),
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **TINY_INIT["config"],
    )
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def eval_recipe(model_dir, tmp_path, **upd) -> dict:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    r = {
        "command": "eval",
        "models": [{"name": "tiny", "path": str(model_dir)}],
        "baseline": {"name": "init", "init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER), "seed": 3},
        "reference": {"name": "same", "path": str(model_dir)},
        "data": {
            "text": {"path": str(DATA / "tiny" / "text_eval.jsonl"), "max_rows": 6},
            "prompts": {
                "path": str(DATA / "tiny" / "prompt_completion.jsonl"),
                "max_rows": 8,
                "columns": {"reference": "completion"},
            },
            "pairs": {"path": str(pairs)},
        },
        "metrics": [
            "perplexity",
            "bleu",
            "rouge",
            "reward",
            "win_rate",
            "kl",
            "distinct",
            "length",
            "preference_accuracy",
        ],
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "rewards": [{"kind": "keyword", "keywords": ["light"], "name": "light"}, {"kind": "sentiment"}],
        "perplexity": {"window_tokens": 32, "stride_tokens": 16},
        "win_rate": {"bootstrap_samples": 200},
        "seed": 0,
    }
    r.update(upd)
    return r


@pytest.mark.slow
def test_eval_end_to_end(tmp_path, write_recipe, cli, tiny_model_dir, reward_model_dir):
    import sacrebleu

    d = eval_recipe(tiny_model_dir, tmp_path)
    d["rewards"].append({"kind": "model", "path": str(reward_model_dir), "name": "rm", "weight": 0.5})
    out = tmp_path / "ev"
    code, stdout, stderr = cli("eval", write_recipe(d), "-o", out)
    assert code == 0, stderr
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["status"] == "completed" and s["exit_code"] == 0 and set(s["models"]) == {"tiny", "init"}
    assert "prefcli eval" in stderr and "win rate vs baseline" in stderr and "BLEU signature" in stderr  # the table
    assert json.loads((out / "summary.json").read_text())["models"]["tiny"]["bleu"] == s["models"]["tiny"]["bleu"]
    rows = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    kinds = [(r["kind"], r.get("model")) for r in rows]
    assert kinds.count(("perplexity", "tiny")) == 6 and kinds.count(("generation", "init")) == 8
    assert kinds.count(("pair", None)) == 3
    tiny, init = s["models"]["tiny"], s["models"]["init"]
    gen = [r for r in rows if r["kind"] == "generation" and r["model"] == "tiny"]
    # the summary agrees with the per-example rows and with the reference libraries
    ppl_rows = [r for r in rows if r["kind"] == "perplexity" and r["model"] == "tiny"]
    assert tiny["perplexity"]["ppl"] == pytest.approx(
        math.exp(sum(r["nll"] for r in ppl_rows) / sum(r["tokens"] for r in ppl_rows))
    )
    want = sacrebleu.corpus_bleu([r["completion"] for r in gen], [[r["reference"] for r in gen]])
    assert tiny["bleu"]["score"] == pytest.approx(want.score) and tiny["bleu"]["signature"].startswith("nrefs:1|")
    assert tiny["win_rate"]["win_rate"] == pytest.approx(sum(r["win"] for r in gen) / 8)
    assert tiny["win_rate"]["ci_low"] <= tiny["win_rate"]["win_rate"] <= tiny["win_rate"]["ci_high"]
    assert "win_rate" not in init  # the baseline is not compared with itself
    # length-controlled win rate: refitted here from the per-example rows (words of each completion)
    lc = tiny["win_rate"]["length_controlled"]
    base = {r["index"]: r for r in rows if r["kind"] == "generation" and r["model"] == "init"}
    want_lc = M.length_controlled_win_rate(
        [r["win"] for r in gen], [r["words"] for r in gen], [base[r["index"]]["words"] for r in gen], 200, 0.95, 0
    )
    assert lc["lc_win_rate"] == pytest.approx(want_lc["lc_win_rate"]) and lc["unit"] == "words"
    assert "length-controlled win rate" in stderr and "corr(reward, tokens)" in stderr
    corr = tiny["reward"]["length_correlation"]  # every completion fills its 8 tokens here: r is undefined (nan)
    want = M.pearson([r["reward"] for r in gen], [r["tokens"] for r in gen])
    assert corr["pearson"] == pytest.approx(want, nan_ok=True) and corr["unit"] == "tokens" and corr["n"] == 8
    assert tiny["reward"]["mean"] == pytest.approx(sum(r["reward"] for r in gen) / 8)
    assert set(tiny["reward"]["parts"]) == {"light", "sentiment", "rm"}
    # the reference is the same model: every per-completion KL is exactly 0; the random baseline differs
    assert tiny["kl"]["k1"] == 0.0 and tiny["kl"]["k3"] == 0.0 and all(r["kl"] == 0.0 for r in gen)
    assert init["kl"]["k1"] > 0 and init["kl"]["k3"] > 0
    assert 0 < tiny["distinct"]["distinct-1"] <= 1 and set(tiny["distinct"]) == {"distinct-1", "distinct-2"}
    assert tiny["length"]["tokens"]["max"] <= 8 and sum(tiny["length"]["finish_reason"].values()) == 8
    # preference accuracy: the 'light' rule prefers every chosen completion, by construction
    pa = s["preference_accuracy"]
    prs = [r for r in rows if r["kind"] == "pair"]
    wc = [len(r["chosen"].split()) for r in prs] + [len(r["rejected"].split()) for r in prs]
    want = M.pearson([r["reward_chosen"] for r in prs] + [r["reward_rejected"] for r in prs], wc)
    assert pa["total"]["length_correlation"]["pearson"] == pytest.approx(want)
    assert (
        pa["total"]["chosen_longer"] == sum(1 for r in prs if len(r["chosen"].split()) > len(r["rejected"].split())) / 3
    )
    assert pa["light"] == {"accuracy": 1.0, "ties": 0, "margin_mean": 1.0, "n": 3}
    assert set(pa) == {"total", "light", "sentiment", "rm"} and 0 <= pa["rm"]["accuracy"] <= 1
    assert (out / "recipe.yaml").exists()


def test_eval_only_preference_accuracy_loads_no_policy(tmp_path, write_recipe, cli, tiny_model_dir):
    d = eval_recipe(
        tiny_model_dir,
        tmp_path,
        metrics=["preference_accuracy"],
        baseline=None,
        reference=None,
        rewards=[{"kind": "keyword", "keywords": ["light"]}],
    )
    d["data"] = {"pairs": d["data"]["pairs"]}
    code, stdout, stderr = cli("eval", write_recipe(d), "-o", tmp_path / "ev", "-q")
    assert code == 0, stderr
    s = last_json(stdout)
    assert s["preference_accuracy"]["total"]["accuracy"] == 1.0 and s["models"] == {}
    assert stderr == ""  # --quiet


def _bad(cli, recipe, tmp_path, match, *extra):
    code, stdout, stderr = cli("eval", recipe, "-o", tmp_path / "never", *extra)
    assert code == 2, stderr
    assert match in stderr, stderr
    assert last_json(stdout)["status"] == "invalid"
    assert not (tmp_path / "never").exists()


def test_eval_bad_input_exits_2_and_writes_nothing(tmp_path, write_recipe, cli, tiny_model_dir, monkeypatch):
    d = eval_recipe(tiny_model_dir, tmp_path, reference=None)
    _bad(cli, write_recipe(d), tmp_path, "metric 'kl' needs reference")
    d = eval_recipe(tiny_model_dir, tmp_path, metrics=["perplexity"])
    _bad(cli, write_recipe(d), tmp_path, "data.prompts is given but no listed metric reads it")
    d = eval_recipe(tiny_model_dir, tmp_path, metrics=["bleu"], baseline=None, reference=None)
    d["data"] = {"prompts": {"path": str(DATA / "tiny" / "prompt_completion.jsonl")}}
    _bad(cli, write_recipe(d), tmp_path, "missing column(s) reference")
    d["models"].append({"path": str(tiny_model_dir)})
    d["models"][0].pop("name")
    _bad(cli, write_recipe(d), tmp_path, "two models are named")
    d = eval_recipe(tiny_model_dir, tmp_path, metrics=["perplexity"], baseline=None, reference=None)
    d["data"] = {"text": d["data"]["text"]}
    d["perplexity"] = {"window_tokens": 512}
    _bad(cli, write_recipe(d), tmp_path, "exceeds the model's max_position_embeddings (256)")
    d["perplexity"] = {"window_tokens": 32}
    d["models"] = [{"from_recipe": str(ROOT / "recipes" / "tiny" / "sft.yaml")}]
    monkeypatch.chdir(tmp_path)  # the sft recipe's default run folder is under the current directory: nothing there
    _bad(cli, write_recipe(d), tmp_path, "no trained model at")
    d["models"] = [{"path": str(tiny_model_dir), "seed": 3}]
    _bad(cli, write_recipe(d), tmp_path, "seed applies to init only")


@pytest.mark.slow
def test_eval_refuses_a_folder_with_results_unless_overwrite(tmp_path, write_recipe, cli, tiny_model_dir):
    d = eval_recipe(tiny_model_dir, tmp_path, metrics=["perplexity"], baseline=None, reference=None)
    d["data"] = {"text": d["data"]["text"]}
    p = write_recipe(d)
    out = tmp_path / "ev"
    assert cli("eval", p, "-o", out, "-q")[0] == 0
    before = (out / "summary.json").read_text()
    code, stdout, stderr = cli("eval", p, "-o", out, "-q")
    assert code == 2 and "holds another evaluation" in stderr and (out / "summary.json").read_text() == before
    code, stdout, stderr = cli("eval", p, "-o", out, "-q", "--overwrite", "--set", "data.text.max_rows=2")
    assert code == 0 and len((out / "examples.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_tiny_recipe_after_tiny_sft(tmp_path, cli, monkeypatch):
    """The documented flow: `prefcli sft recipes/tiny/sft.yaml` then `prefcli eval recipes/tiny/eval.yaml`, from the
    same folder; eval finds the trained model through from_recipe. (Shortened with --set; in this process:
    tests/test_pipelines.py runs the real `prefcli eval` in shell pipelines.)"""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = cli(
        "sft",
        ROOT / "recipes" / "tiny" / "sft.yaml",
        "-q",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.eval_every_steps=null",
        "--set",
        "train.save_every_steps=null",
    )
    assert code == 0, stderr
    sft_ppl = last_json(stdout)["final"]["eval/ppl"]
    assert (tmp_path / "runs" / "sft-sft" / "final" / "config.json").exists()
    code, stdout, stderr = cli(
        "eval",
        ROOT / "recipes" / "tiny" / "eval.yaml",
        "--set",
        "data.prompts.max_rows=6",
        "--set",
        "win_rate.bootstrap_samples=100",
        "--set",
        "generation.max_new_tokens=8",
    )
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1  # stdout: exactly the summary
    s = json.loads(lines[0])
    assert set(s["models"]) == {"sft", "init"} and s["models"]["sft"]["model"].endswith("runs/sft-sft/final")
    assert s["models"]["init"]["kl"]["k1"] == 0.0 and s["models"]["sft"]["kl"]["k3"] > 0  # init vs itself, sft moved
    # the same held-out verses, EOS included: eval's perplexity is the number sft logged at its end
    assert s["models"]["sft"]["perplexity"]["ppl"] == pytest.approx(sft_ppl, rel=1e-5)
    assert s["models"]["sft"]["perplexity"]["ppl"] < s["models"]["init"]["perplexity"]["ppl"]
    assert s["output_dir"] == str(tmp_path / "runs" / "eval-eval")
    assert (tmp_path / "runs" / "eval-eval" / "examples.jsonl").exists()
    assert "perplexity" in stderr and "BLEU signature" in stderr
    # generate --recipe with a training recipe: the model it trained
    from typer.testing import CliRunner

    from prefcli.cli import app

    r = CliRunner().invoke(
        app,
        ["generate", "--recipe", str(ROOT / "recipes" / "tiny" / "sft.yaml"), "--max-new-tokens", "3", "-q"],
        input="And the\n",
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] <= 3


def test_generate_from_an_eval_recipe_model_by_name(tmp_path, write_recipe, tiny_model_dir):
    from typer.testing import CliRunner

    from prefcli.cli import app

    d = eval_recipe(tiny_model_dir, tmp_path, generation={"max_new_tokens": 3, "do_sample": False})
    p = write_recipe(d)
    r = CliRunner().invoke(app, ["generate", "--recipe", str(p), "--model", "init", "-q"], input="And the\n")
    assert r.exit_code == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["tokens"] == 3  # the recipe's max_new_tokens
    r = CliRunner().invoke(app, ["generate", "--recipe", str(p), "--model", "nope"], input="x\n")
    assert r.exit_code == 2 and "no model of that name (models: tiny, init)" in r.stderr
