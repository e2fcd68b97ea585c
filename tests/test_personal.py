"""Personalised reward models (`reward.personalisation`) and the user column: constructed users with exactly
opposite tastes on a learnable signal (the tiny data's ", saith the LORD." ending), the saved user part and its
scorer, the unknown-user fallback, exact resume, and the pieces (encoder, fitting, per-user figures) by hand."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from prefcli.algos.reward_users import new_user_curve, per_user_accuracy
from prefcli.analysis.inspect.checks import majority_disagreement
from prefcli.engine import personal
from prefcli.engine.users import find_user_column, read_users, split_users
from prefcli.errors import DataError, UsageError
from prefcli.recipe.reward_specs import ModelReward
from prefcli.reward_sources import ModelSource, build_rewards
from prefcli.runner import RunOptions, run_training

from .conftest import DATA, TINY_INIT, TOKENIZER, deep_update, losses

# ------------------------------------------------------------------------------------------- data


def _rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (DATA / "tiny" / name).read_text().splitlines() if x.strip()]


def _flip(r: dict) -> dict:
    return {**r, "chosen": r["rejected"], "rejected": r["chosen"]}


@pytest.fixture(scope="module")
def opposite(tmp_path_factory) -> Path:
    """Users 'a' (prefers the ', saith the LORD.' ending) and 'b' (the opposite) label the same training pairs;
    held out: their labels on other pairs, and those of 'c', a new user with b's taste. Also c's first 10 held-out
    labels as a context file."""
    d = tmp_path_factory.mktemp("opposite")
    train = [x for r in _rows("pref_train.jsonl")[:96] for x in ({**r, "rater": "a"}, {**_flip(r), "rater": "b"})]
    ev = _rows("pref_eval.jsonl")[:48]
    held = [x for r in ev for x in ({**r, "rater": "a"}, {**_flip(r), "rater": "b"}, {**_flip(r), "rater": "c"})]
    for name, rows in (("train", train), ("eval", held), ("context_c", [_flip(r) for r in ev[:10]])):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return d


def rm(data: Path, **upd) -> dict:
    r = {
        "command": "reward",
        "model": {"init": json.loads(json.dumps(TINY_INIT)), "tokenizer": str(TOKENIZER)},
        "data": {"train": {"path": str(data / "train.jsonl")}, "eval": {"path": str(data / "eval.jsonl")}},
        "reward": {},
        "train": {"max_steps": 60, "batch_size": 16, "lr": 3e-3, "seed": 0},
        "output": {"plot": False},
    }
    r["data"]["max_length"] = 64
    return deep_update(r, upd)


def train(tmp_path: Path, write_recipe, name: str, d: dict, *sets: str, resume: bool = False) -> dict:
    p = write_recipe(d, name=f"{name}.yaml")
    return run_training("reward", p, RunOptions(overrides=list(sets), output_dir=str(tmp_path / name), quiet=True,
                                                resume=resume))  # fmt: skip


@pytest.fixture(scope="module")
def runs(opposite, tmp_path_factory):
    """One run per kind on the opposite users (and a pooled one), shared by the tests below."""
    import yaml

    d = tmp_path_factory.mktemp("personal-runs")
    out = {}
    for kind in ("pooled", "user_embedding", "latent", "lowrank"):
        r = rm(opposite, reward={"personalisation": {"kind": kind}} if kind != "pooled" else {})
        if kind == "pooled":
            r["train"]["max_steps"] = 8
        p = d / f"{kind}.yaml"
        p.write_text(yaml.safe_dump(r, sort_keys=False))
        out[kind] = (run_training("reward", p, RunOptions(output_dir=str(d / kind), quiet=True)), d / kind)
    return out


# -------------------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_opposite_users_pooled_is_at_chance_and_each_kind_serves_both(runs):
    pooled = runs["pooled"][0]["final"]
    # every held-out pair is labelled once by a and once by b, oppositely: whatever a pooled model scores, it is
    # right for exactly one of them, so their accuracies sum to 1 and the worst user is at chance or below
    assert pooled["eval/accuracy/a"] + pooled["eval/accuracy/b"] == pytest.approx(1.0)
    assert pooled["eval/accuracy_worst_user"] <= 0.5
    assert pooled["eval/new_user/accuracy@0"] == pytest.approx(pooled["eval/accuracy/b"])  # c labels as b does
    for kind in ("user_embedding", "latent", "lowrank"):
        f = runs[kind][0]["final"]
        print(kind, {k: round(v, 3) for k, v in f.items() if k.startswith("eval/") and "@" not in k})
        assert f["eval/accuracy/a"] >= 0.95 and f["eval/accuracy/b"] >= 0.95, kind  # held-out rows of seen users
        assert f["eval/accuracy_worst_user"] >= 0.95 and f["eval/pairs"] == 96, kind
        assert 0.3 <= f["eval/accuracy_shared"] <= 0.7, kind  # the shared part alone cannot serve both
    for kind in ("latent", "lowrank", "user_embedding"):  # a held-out user given 10 of their labels
        assert runs[kind][0]["final"]["eval/new_user/accuracy@10/c"] >= 0.95, kind
    s = runs["latent"][0]
    assert s["data"]["users"] == {"column": "rater", "train": ["a", "b"], "new_in_eval": ["c"]}
    assert s["objective"]["personalisation"]["kind"] == "latent" and s["model"]["user_parameters"] > 0


@pytest.mark.slow
def test_the_saved_user_part_scores_as_training_did_and_an_unknown_user_gets_the_shared_part(runs, opposite):
    final = runs["user_embedding"][1] / "final"
    cfg = json.loads((final / "personalisation" / "config.json").read_text())
    assert cfg["kind"] == "user_embedding" and cfg["users"] == ["a", "b"] and cfg["user_column"] == "rater"
    rows = [json.loads(x) for x in (opposite / "eval.jsonl").read_text().splitlines()]
    a_rows = [r for r in rows if r["rater"] == "a"]
    prompts, chosen, rejected = (
        [r["prompt"] for r in a_rows],
        [r["chosen"] for r in a_rows],
        [r["rejected"] for r in a_rows],
    )
    # the shared part is a plain transformers reward model
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    src = ModelSource(ModelReward(kind="model", path=str(final), max_length=64))
    enc = src._encode(prompts, chosen)
    with torch.no_grad():
        logits = hf(**enc).logits[:, 0]
        h = hf.model(**enc).last_hidden_state[torch.arange(len(prompts)), enc["attention_mask"].sum(1) - 1]
    assert src(prompts, chosen) == pytest.approx(logits.tolist(), abs=1e-5)  # no user: the shared part
    # a known user: shared score + the stored head offset . h, computed here by hand
    offsets = load_file(str(final / "personalisation" / "model.safetensors"))["user_offsets"]
    by_hand = logits + h @ offsets[0]
    assert src(prompts, chosen, users=["a"] * len(prompts)) == pytest.approx(by_hand.tolist(), abs=1e-4)
    fixed = ModelSource(ModelReward(kind="model", path=str(final), max_length=64, user="b"))
    assert fixed(prompts, chosen) == pytest.approx((logits + h @ offsets[1]).tolist(), abs=1e-4)
    # an unknown user: the shared part, and one warning naming them (through the reward set)
    said: list[str] = []
    rs = build_rewards([ModelReward(kind="model", path=str(final), max_length=64)], warn=said.append)
    total, _ = rs.score(prompts, chosen, users=["zed"] * len(prompts))
    assert total == pytest.approx(logits.tolist(), abs=1e-5)
    assert len(said) == 1 and "'zed'" in said[0] and "shared part" in said[0]
    # a's reward prefers a's choices on held-out rows
    sc, sr = src(prompts, chosen, users=["a"] * len(prompts)), src(prompts, rejected, users=["a"] * len(prompts))
    assert sum(x > y for x, y in zip(sc, sr)) / len(sc) >= 0.95
    with pytest.raises(UsageError, match="user 'zed' is not a user of the reward model"):
        ModelSource(ModelReward(kind="model", path=str(final), user="zed"))


@pytest.mark.slow
def test_a_new_user_from_a_context_file_without_retraining(runs, opposite):
    rows = [json.loads(x) for x in (opposite / "eval.jsonl").read_text().splitlines()]
    c_rows = [r for r in rows if r["rater"] == "c"][10:]  # past the 10 of the context file
    p, ch, rj = [r["prompt"] for r in c_rows], [r["chosen"] for r in c_rows], [r["rejected"] for r in c_rows]
    for kind in ("latent", "lowrank"):
        final = runs[kind][1] / "final"
        src = ModelSource(
            ModelReward(kind="model", path=str(final), max_length=64, context=str(opposite / "context_c.jsonl"))
        )
        acc = sum(x > y for x, y in zip(src(p, ch), src(p, rj))) / len(p)
        shared = ModelSource(ModelReward(kind="model", path=str(final), max_length=64))
        acc0 = sum(x > y for x, y in zip(shared(p, ch), shared(p, rj))) / len(p)
        print(kind, "new user c from 10 pairs:", acc, "shared part:", acc0)
        assert acc >= 0.95, kind


def test_user_or_context_needs_a_personalised_model(tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="needs a personalised reward model"):
        ModelSource(ModelReward(kind="model", path=str(tiny_model_dir), user="a"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["user_embedding", "latent"])
def test_resume_is_exact_with_user_parameters_and_their_optimizer_state(kind, opposite, tmp_path, write_recipe):
    d = rm(opposite, reward={"personalisation": {"kind": kind}}, train={"max_steps": 6, "save_every_steps": 3})
    whole = train(tmp_path, write_recipe, "whole", d)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-3", tmp_path / "resumed" / "checkpoints" / "step-3")
    resumed = train(tmp_path, write_recipe, "resumed", d, resume=True)
    assert resumed["resumed_from"].endswith("step-3")
    a, b = losses(tmp_path / "whole", "loss/bradley_terry"), losses(tmp_path / "resumed", "loss/bradley_terry")
    assert {k: a[k] for k in (4, 5, 6)} == {k: b[k] for k in (4, 5, 6)}  # bit for bit
    ta = load_file(str(tmp_path / "whole" / "final" / "personalisation" / "model.safetensors"))
    tb = load_file(str(tmp_path / "resumed" / "final" / "personalisation" / "model.safetensors"))
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert whole["final"]["eval/accuracy"] == resumed["final"]["eval/accuracy"]


# -------------------------------------------------------------------------------------- the parts


def test_the_latent_encoder_treats_each_group_of_pairs_on_its_own():
    torch.manual_seed(0)
    cond = personal.make_conditioner("latent", ["a", "b"], 6, {"latent_dim": 3, "encoder_dim": 8})
    hc, hr = torch.randn(7, 6), torch.randn(7, 6)
    group = torch.tensor([1, 0, 1, 1, 0, 2, 1])
    mu, logvar = cond.encode(hc, hr, group, 3)
    for g in range(3):
        sel = group == g
        m1, v1 = cond.encode(hc[sel], hr[sel], torch.zeros(int(sel.sum()), dtype=torch.long), 1)
        assert torch.allclose(mu[g], m1[0], atol=1e-5) and torch.allclose(logvar[g], v1[0], atol=1e-5)
    # a set: the order of a group's pairs does not matter
    perm = torch.tensor([6, 5, 4, 3, 2, 1, 0])
    mu2, _ = cond.encode(hc[perm], hr[perm], group[perm], 3)
    assert torch.allclose(mu, mu2, atol=1e-5)
    assert personal.gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0
    # KL(N(1, e^0) || N(0, 1)) = 1/2 per dimension with mean 1
    assert personal.gaussian_kl(torch.ones(1, 3), torch.zeros(1, 3)).item() == pytest.approx(1.5)


def test_fitting_a_new_user_finds_the_direction_of_their_labels():
    """user_embedding: L-BFGS on sum softplus(-(m_s + e . dh)) + lambda ||e||^2, a convex problem: at the optimum
    the gradient is zero, and the fitted user ranks their own pairs right; lowrank: weights on the simplex."""
    torch.manual_seed(0)
    d = 5
    truth = torch.tensor([2.0, -1.0, 0.0, 0.5, 0.0])
    hr = torch.randn(40, d)
    hc = hr + torch.randn(40, d)
    flip = (hc - hr) @ truth < 0
    hc[flip], hr[flip] = hr[flip].clone(), hc[flip].clone()  # every pair labelled by the truth
    cond = personal.make_conditioner("user_embedding", [], d, {"fit_l2": 0.1})
    e = cond.fit(hc, hr, torch.zeros(40)).double().requires_grad_(True)
    dh = (hc - hr).double()
    loss = torch.nn.functional.softplus(-(dh @ e)).sum() + 0.1 * (e * e).sum()
    (g,) = torch.autograd.grad(loss, e)
    assert g.abs().max() < 1e-4
    assert ((dh @ e.detach()) > 0).float().mean() == 1.0
    assert torch.equal(cond.fit(hc[:0], hr[:0], torch.zeros(0)), torch.zeros(d))  # no labels: the shared model
    low = personal.make_conditioner("lowrank", [], d, {"rank": 2, "fit_l2": 0.0})
    with torch.no_grad():
        low.basis.copy_(torch.stack([truth, -truth]))
    w = low.fit(hc, hr, torch.zeros(40))
    assert w.sum().item() == pytest.approx(1.0) and w[0] > 0.99  # all weight on the head that agrees


def test_per_user_accuracy_and_the_new_user_curve_by_hand():
    m = torch.tensor([1.0, -1.0, 0.0, 2.0, -3.0])
    out = per_user_accuracy(m, [0, 0, 1, 1, -1], ["x", "y"])
    assert out == {"eval/accuracy/x": 0.5, "eval/accuracy/y": 0.75, "eval/accuracy_worst_user": 0.5}
    # a fake model: a user's state is the number of context labels; rows score right when state >= 5
    curve = new_user_curve(
        lambda ctx: torch.tensor(float(len(ctx))),
        lambda state, rows: torch.full((len(rows),), 1.0 if state >= 5 else -1.0),
        {"u": list(range(40)), "v": list(range(40, 60))},
        [0, 5, 20],
        3,
        seed=0,
    )
    assert curve["eval/new_user/accuracy@0"] == 0.0 and curve["eval/new_user/accuracy@5"] == 1.0
    # v has 20 rows: its pool is 10 of them, so "20 labels" gives it the 10 it has
    assert curve["eval/new_user/accuracy@20/v"] == 1.0 and set(curve) >= {"eval/new_user/accuracy@20/u"}


def test_the_user_column_and_held_out_users():
    import datasets

    ds = datasets.Dataset.from_list([{"x": i, "rater": r} for i, r in enumerate(["a", "b", None, "a", "7", " "])])
    assert find_user_column(ds.column_names, None) == "rater"
    assert find_user_column(["user_id", "x"], None) == "user_id" and find_user_column(["x"], None) is None
    assert find_user_column(ds.column_names, "who") is None
    users = read_users(ds, "rater", "f.jsonl", "data.train")
    assert users == ["a", "b", None, "a", "7", None]
    train, held, names = split_users(ds, users, ["a"], 0.0, 0, "f.jsonl")
    assert names == ["a"] and held["x"] == [0, 3] and train["x"] == [1, 2, 4, 5]
    _, held2, names2 = split_users(ds, users, [], 0.34, 0, "f.jsonl")  # 1 of 3 users
    assert len(names2) == 1 and all(users[i] == names2[0] for i in held2["x"])
    with pytest.raises(DataError, match="never appear"):
        split_users(ds, users, ["q"], 0.0, 0, "f.jsonl")
    ints = datasets.Dataset.from_list([{"user_id": 3}, {"user_id": 12}])
    assert read_users(ints, "user_id", "f.jsonl", "data.train") == ["3", "12"]
    bad = datasets.Dataset.from_list([{"rater": [1]}])
    with pytest.raises(DataError, match="row 1: user 'rater'"):
        read_users(bad, "rater", "f.jsonl", "data.train")


def test_disagreement_with_the_majority_of_the_others():
    units = {"i": [1, 1, 0], "j": [0, 0], "k": [1], "t": [1, 0, 1, 0]}
    # the rater who gave 0 on i, 0 on j, 1 on k (alone), 0 on t (others: 1, 0, 1 -> majority 1)
    shared, share = majority_disagreement({"i": 0, "j": 0, "k": 1, "t": 0}, units)
    assert shared == 3 and share == pytest.approx(2 / 3)  # i: others say 1 (differs), j: 0 (agrees), t: differs
    assert majority_disagreement({"k": 1}, units) == (0, None)
    assert majority_disagreement({"i": 1}, units) == (1, None)  # others 1, 0: a tie, left out


# -------------------------------------------------------------------------------------- policies


def dpo(data: Path, **upd) -> dict:
    r = rm(data, command="contrastive", reward=None)
    del r["reward"]
    r["contrastive"] = {"objective": "dpo", "beta": 0.5}
    r["train"]["max_steps"] = 40
    return deep_update(r, upd)


@pytest.mark.slow
def test_a_personalised_dpo_policy_serves_opposite_users_and_generate_and_eval_serve_each(
    opposite, tmp_path, write_recipe, cli
):
    from prefcli.engine.personal import policy_users

    runs = {}
    for name, upd in (
        ("pooled", {"train": {"max_steps": 8}}),
        ("personal", {"contrastive": {"personalisation": {"kind": "user_token"}}, "train": {"eval_on_start": True}}),
    ):
        p = write_recipe(dpo(opposite, **upd), name=f"dpo-{name}.yaml")
        runs[name] = run_training("contrastive", p, RunOptions(output_dir=str(tmp_path / name), quiet=True))
    pooled, personal = runs["pooled"]["final"], runs["personal"]["final"]
    # the same pair labelled oppositely by a and b: a pooled policy's implicit reward is right for exactly one
    assert pooled["eval/accuracy/a"] + pooled["eval/accuracy/b"] == pytest.approx(1.0)
    assert personal["eval/accuracy/a"] >= 0.95 and personal["eval/accuracy/b"] >= 0.95
    assert personal["eval/accuracy_worst_user"] >= 0.95 and "eval/new_user/accuracy@0" in personal
    first = [r for r in (json.loads(x) for x in (tmp_path / "personal" / "metrics.jsonl").read_text().splitlines())]
    assert first[0]["step"] == 0 and first[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # = reference
    final = tmp_path / "personal" / "final"
    assert (
        policy_users(final) == {"a": "<|user:a|>", "b": "<|user:b|>"}
        and policy_users(tmp_path / "pooled" / "final") is None
    )
    # generate --user: the user's token leads the prompt; an unknown user gets none, with a warning
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    (tmp_path / "p.txt").write_text("And ye shall chase\n")
    code, out, err = cli(
        "generate", final, "-p", tmp_path / "p.txt", "--user", "a", "--max-new-tokens", "4", "--greedy"
    )
    assert code == 0 and json.loads(out)["prompt"] == "And ye shall chase"
    from prefcli.evaluate.generation import Generator
    from prefcli.evaluate.loading import load_lm, make_runtime
    from prefcli.recipe.commands.eval import GenerationSection
    from prefcli.recipe.sections import ModelSection

    lm, t = load_lm(ModelSection(path=str(final)), make_runtime("cpu"))
    said: list[str] = []
    g = Generator(lm, t, GenerationSection(max_new_tokens=4), "cpu", warn=said.append, users=policy_users(final))
    plain = tok("And ye shall chase")["input_ids"]
    assert g.encode("And ye shall chase", "b") == [tok.convert_tokens_to_ids("<|user:b|>")] + plain
    assert g.encode("And ye shall chase", "zed") == plain and len(said) == 1 and "'zed'" in said[0]
    code, out, err = cli("generate", tmp_path / "pooled" / "final", "-p", tmp_path / "p.txt", "--user", "a")
    assert code == 2 and "is not a personalised policy" in err
    # eval: each prompt generated for its row's user, rewarded per user
    rows = [json.loads(x) for x in (opposite / "eval.jsonl").read_text().splitlines()][:12]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"], "rater": r["rater"]}) + "\n" for r in rows)
    )
    ev = {
        "command": "eval",
        "models": [{"name": "personal", "path": str(final)}],
        "baseline": {"name": "pooled", "path": str(tmp_path / "pooled" / "final")},
        "data": {"prompts": {"path": str(tmp_path / "prompts.jsonl")}},
        "metrics": ["reward", "win_rate"],
        "generation": {"max_new_tokens": 6},
        "rewards": [{"kind": "length", "target": 4, "unit": "words"}],
    }
    code, out, err = cli("eval", write_recipe(ev, name="ev.yaml"), "-o", tmp_path / "ev", "-q")
    s = json.loads(out.strip().splitlines()[-1])
    assert code == 0, err
    m = s["models"]["personal"]
    assert m["personalised"] is True and set(m["reward"]["per_user"]) == {"a", "b", "c"}
    assert m["reward"]["worst_user"]["mean"] == min(m["reward"]["per_user"].values())
    assert set(m["win_rate"]["per_user"]) == {"a", "b", "c"}
    ex = [json.loads(x) for x in (tmp_path / "ev" / "examples.jsonl").read_text().splitlines()]
    assert [r["user"] for r in ex if r["model"] == "personal"] == [r["rater"] for r in rows]


def test_a_function_reward_with_a_users_parameter_gets_whom_each_completion_is_for():
    from prefcli.recipe.reward_specs import FunctionReward

    taste = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart" / "personal" / "tastes.py") + ":taste"
    rs = build_rewards([FunctionReward(kind="function", function=taste)])
    texts = ["joy and love", "joy and love", "joy and love", "a b c d e f g h i j k l"]
    total, _ = rs.score(["p"] * 4, texts, users=["positive-1", "negative-9", "brief-2", "brief-2"])
    assert total[0] > 0.5 and total[1] == -total[0] and total[2] == -0.3 and total[3] == pytest.approx(-1.2)
    assert rs.score(["p"], ["joy"])[0] == [0.0]  # no user: no taste


@pytest.mark.slow
def test_personalised_rlhf_conditions_each_prompt_and_rewards_it_for_its_user(tmp_path, write_recipe):
    """rlhf.personalisation: a prompt's user token leads it (but for the generic prompts), and the reward sources
    get each completion's user from the prompt rows: a reward that pays 1 for user a and 0 for b reads back as
    eval/reward/a = 1, eval/reward/b = 0."""
    from prefcli.algos.rlhf import build as build_rlhf
    from prefcli.engine.dist import setup_runtime
    from prefcli.engine.run import RunContext
    from prefcli.recipe import load_recipe

    from .test_rlhf import rlhf_recipe

    rows = [json.loads(x) for x in (DATA / "tiny" / "prompts.jsonl").read_text().splitlines()][:16]
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({**r, "rater": "ab"[i % 2]}) + "\n" for i, r in enumerate(rows))
    )
    (tmp_path / "who.py").write_text(
        "def reward(prompts, completions, users=None):\n    return [1.0 if u == 'a' else 0.0 for u in users]\n"
    )
    d = rlhf_recipe(
        data={
            "train": {"path": str(tmp_path / "p.jsonl")},
            "eval": {"path": str(tmp_path / "p.jsonl"), "max_rows": 16},
        },
        rewards=[{"kind": "function", "function": str(tmp_path / "who.py") + ":reward"}],
        rlhf={"algorithm": "grpo", "personalisation": {"kind": "user_token", "generic_fraction": 0.25}},
        train={"max_steps": 2, "eval_every_steps": 2},
    )
    p = write_recipe(d, name="prl.yaml")
    task = build_rlhf(RunContext(recipe=load_recipe(p).recipe, rt=setup_runtime("cpu", "fp32"), run_dir=tmp_path))
    lr = task.prompts
    tok = task.tok
    ids = {u: tok.convert_tokens_to_ids(f"<|user:{u}|>") for u in "ab"}
    plain = [tok(r["prompt"])["input_ids"] for r in rows]
    for i in range(16):
        u = "ab"[i % 2]
        want = plain[i] if i in lr.users.generic else [ids[u]] + plain[i]
        assert lr.ids[i] == want[-len(lr.ids[i]) :], i
        assert lr.eval_ids[i][0] == ids[u]  # held-out prompts always carry their user's token
    assert 0 < len(lr.users.generic) < 16
    s = run_training("rlhf", p, RunOptions(output_dir=str(tmp_path / "run"), quiet=True))
    f = s["final"]
    assert f["eval/reward/a"] == 1.0 and f["eval/reward/b"] == 0.0 and f["eval/reward_worst_user"] == 0.0
    assert s["data"]["users"]["train"] == ["a", "b"]
    assert json.loads((tmp_path / "run" / "final" / "personalisation" / "config.json").read_text())["users"] == {
        "a": "<|user:a|>",
        "b": "<|user:b|>",
    }
