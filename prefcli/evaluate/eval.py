"""`prefcli eval RECIPE.yaml`: measure one or more models (and a baseline) on held-out data.

    prefcli eval recipes/tiny/eval.yaml                  # after `prefcli sft recipes/tiny/sft.yaml`
    prefcli eval my.yaml --set data.prompts.max_rows=100 -o runs/eval-try | jq .models

Order (the bad-input contract): the recipe is validated, the output folder checked, the data read
and every model reference resolved *before* any model runs, so bad input exits 2 having written
nothing. Then, one model at a time (the reference, when kl is asked for, stays loaded):
perplexity over data.text, completions for data.prompts, the metrics on them; then the rewards
score every model's completions (win rates against the baseline's) and the preference pairs.
Output: a rich table on stderr, the summary as the one JSON line on stdout (and summary.json),
one row per example and model in examples.jsonl, the resolved recipe.yaml.

The formulas are in `metrics.py` (and docs/commands/eval.md); model scoring in `scoring.py`.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError
from ..recipe import dump_recipe, load_recipe
from ..recipe.commands import EvalModel, EvalRecipe
from ..recipe.commands.eval import SAMPLED_METRICS
from . import metrics as M
from .inputs import EvalInputs, read_inputs
from .report import ARTIFACTS, Log, print_table, write_outputs

GENERATION_METRICS = ("bleu", "rouge", "reward", "win_rate", "kl", "distinct", "length")


@dataclass
class EvalOptions:
    overrides: list[str] = field(default_factory=list)
    output_dir: str | None = None
    overwrite: bool = False
    quiet: bool = False
    completions: str | None = None  # --completions FILE|-: sets data.completions


@dataclass
class ModelEntry:
    name: str
    role: str  # "model" | "baseline"
    spec: EvalModel
    section: Any  # ModelSection


def run_dir_for(recipe: EvalRecipe, recipe_path: Path, opts: EvalOptions) -> Path:
    if opts.output_dir:
        return Path(opts.output_dir).resolve()
    if recipe.output.dir:
        return Path(recipe.output.dir)
    return Path.cwd() / "runs" / f"eval-{recipe_path.stem}"


def check_output(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output dir {run_dir} exists and is not a folder")
    held = [a for a in ARTIFACTS if (run_dir / a).exists()]
    if held and not overwrite:
        raise UsageError(
            f"output dir {run_dir} holds another evaluation ({', '.join(held)}). Use --overwrite to "
            "replace it, or --output-dir for a new folder."
        )


# ----------------------------------------------------------------------------- models


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def perplexity_for(
    policy, lm, tok, inputs: EvalInputs, r: EvalRecipe, rt, name: str, log: Log, rows_out: list[dict], check=None
) -> dict:
    from ..engine.data import tokenize_sft
    from .scoring import NO_TRUNCATION, perplexity_nll

    max_pos = getattr(lm.config, "max_position_embeddings", None)
    window = r.perplexity.window_tokens or min(max_pos or 2048, 2048)
    if max_pos is not None and window > max_pos:
        raise UsageError(
            f"perplexity.window_tokens ({window}) exceeds the model's max_position_embeddings "
            f"({max_pos}) for model '{name}'"
        )
    stride = r.perplexity.stride_tokens or max(1, window // 2)
    if stride > window:
        raise UsageError(f"perplexity.stride_tokens ({stride}) exceeds the window ({window} tokens)")
    fmt = inputs.text_format
    data = tokenize_sft(
        inputs.text_rows,
        tok,
        fmt,
        NO_TRUNCATION,
        mask_prompt=fmt != "text",
        add_eos=r.data.add_eos,
        source=r.data.text.path,
    )
    if len(data) == 0:
        raise DataError(f"data.text: {r.data.text.path}: no example has a token to score")
    log.info(f"  perplexity: {len(data)} examples, {data.n_tokens()} tokens, window {window}, stride {stride}")
    res = perplexity_nll(
        policy, data.input_ids, data.labels, window, stride, r.perplexity.batch_size, tok.pad_token_id, rt.device, check
    )
    nll = sum(x.nll for x in res)
    n = sum(x.tokens for x in res)
    for i, x in enumerate(res):
        rows_out.append(
            {
                "kind": "perplexity",
                "model": name,
                "index": i,
                "tokens": x.tokens,
                "nll": x.nll,
                "ppl": M.perplexity(x.nll, x.tokens),
                "windows": x.windows,
            }
        )
    return {
        "ppl": M.perplexity(nll, n),
        "nll_per_token": nll / n if n else math.nan,
        "tokens": n,
        "examples": len(data),
        "dropped": data.n_dropped,
        "windows": sum(x.windows for x in res),
        "window_tokens": window,
        "stride_tokens": stride,
    }


def resolve_models(r: EvalRecipe) -> tuple[list[ModelEntry], Any]:
    from .loading import model_section

    entries = []
    for i, m in enumerate(r.models):
        entries.append(ModelEntry(m.display_name(), "model", m, model_section(m, f"models[{i}]")))
    if r.baseline is not None:
        entries.append(
            ModelEntry(r.baseline.display_name(), "baseline", r.baseline, model_section(r.baseline, "baseline"))
        )
    ref = model_section(r.reference, "reference") if r.reference is not None and "kl" in r.metrics else None
    return entries, ref


def kl_warnings(r: EvalRecipe) -> list[str]:
    g = r.generation
    out = []
    if not g.do_sample:
        out.append(
            "kl: generation.do_sample is false, so the completions are not samples of the policy and k1/k3 "
            "do not estimate KL"
        )
    changed = [
        n
        for n, on in (
            ("top_p", g.top_p < 1),
            ("top_k", g.top_k > 0),
            ("ban", bool(g.ban)),
            ("require", bool(g.require)),
            ("min_new_tokens", g.min_new_tokens > 0),
        )
        if on
    ]
    if changed:
        out.append(
            f"kl: sampling used {', '.join(changed)}, which change the sampled distribution; the log-probs are "
            "those of the full temperature-scaled policy, so KL is approximate"
        )
    return out


def run(recipe_path: str | Path, opts: EvalOptions) -> dict:
    """Validate the recipe, the output folder, the data and the models (bad input exits 2 having written
    nothing), then score the given completions or each model in turn, the rewards and the preference pairs;
    write the outputs and return the summary."""
    t0 = time.perf_counter()
    recipe_path = Path(recipe_path)
    loaded = load_recipe(recipe_path, "eval", opts.overrides + completions_override(opts.completions))
    r: EvalRecipe = loaded.recipe
    run_dir = run_dir_for(r, recipe_path, opts)
    check_output(run_dir, opts.overwrite)
    from ..engine.trackers import check_installed

    check_installed(r.log.report_to)
    log = Log(opts.quiet)
    inputs = read_inputs(r)
    given_recipe = r  # recipe.yaml and the trackers' config: the recipe as given
    r, skipped = _drop_skipped_metrics(r, inputs, log)  # from here on the recipe lists what is computed
    entries, ref_section = resolve_models(r)
    gen_wanted = any(m in r.metrics for m in GENERATION_METRICS) and inputs.given is None

    from .loading import make_runtime

    rt = make_runtime(r.runtime.device, r.runtime.precision, r.runtime.loss_chunk_tokens)
    base_dir = recipe_path.resolve().parent
    rows: list[dict] = []
    results: dict[str, dict] = {}
    gens: dict[str, list] = {}
    if inputs.given is not None:
        results[inputs.given_name] = given_results(inputs, r, entries, rows)
        gens[inputs.given_name] = inputs.given
    rewards = None
    if r.rewards and any(m in r.metrics for m in ("reward", "win_rate", "preference_accuracy")):
        rewards = _build_rewards(r, base_dir, entries, rt, warn=log.warn)
    ref = load_reference(r, ref_section, rt, log) if ref_section is not None else None

    env = None
    if "env" in r.metrics:
        from .env import check_env

        if rewards is None and r.rewards:
            rewards = _build_rewards(r, base_dir, entries, rt)
        env = (check_env(r), rewards)  # bad input (exit 2) before any model loads
    for e in entries if ("perplexity" in r.metrics or gen_wanted or env is not None) else []:
        results[e.name], outs = model_results(e, r, rt, inputs, ref, gen_wanted, log, rows, env)
        if outs is not None:
            gens[e.name] = outs
        _free_memory()

    if rewards is not None and gens and any(m in r.metrics for m in ("reward", "win_rate")):
        reward_results(rewards, gens, inputs, r, results, rows, log)

    pref = None
    if "preference_accuracy" in r.metrics:
        log.info(f"preference accuracy on {len(inputs.pairs)} pairs")
        pref = preference_for(rewards, inputs.pairs, rows, inputs.pair_users)

    summary = eval_summary(recipe_path, run_dir, r, results, skipped, pref, rt, log, t0)
    write_outputs(run_dir, given_recipe, rows, summary, opts.overwrite)
    if not opts.quiet:
        print_table(log, summary)
    report_to_trackers(given_recipe, run_dir, rows, summary, log)
    return summary


def eval_summary(
    recipe_path: Path, run_dir: Path, r: EvalRecipe, results: dict, skipped: list[str], pref, rt, log: Log, t0: float
) -> dict:
    """The summary, the one JSON object on stdout (docs/commands/eval.md); wall_s counts from `t0`."""
    summary: dict[str, Any] = {
        "command": "eval",
        "status": "completed",
        "exit_code": 0,
        "recipe": str(recipe_path),
        "output_dir": str(run_dir),
        "examples_file": str(run_dir / "examples.jsonl"),
        "metrics": list(r.metrics),
        "models": results,
    }
    if skipped:
        summary["skipped_metrics"] = skipped
    if pref is not None:
        summary["preference_accuracy"] = pref
    summary.update(
        {
            "seed": r.seed,
            "device": str(rt.device),
            "precision": rt.precision,
            "warnings": log.warnings,
            "wall_s": round(time.perf_counter() - t0, 3),
        }
    )
    return summary


def _drop_skipped_metrics(r: EvalRecipe, inputs: EvalInputs, log: Log) -> tuple[EvalRecipe, list[str]]:
    """Warn about each metric the inputs cannot give (sampled metrics when data.completions are scored as
    given; those `read_inputs` skipped) and return the recipe without them, and their names."""
    if inputs.given is not None:
        sampled = [m for m in r.metrics if m in SAMPLED_METRICS]
        if sampled:
            log.warn(
                f"{', '.join(sampled)} {'needs' if len(sampled) == 1 else 'need'} completions sampled from the models; "
                "skipped: data.completions are scored as given"
            )
    for why in inputs.skipped.values():
        log.warn(why)
    skipped = [m for m in r.metrics if m in inputs.skipped or (inputs.given is not None and m in SAMPLED_METRICS)]
    if skipped:
        r = r.model_copy(update={"metrics": [m for m in r.metrics if m not in skipped]})
    return r, skipped


def given_results(inputs: EvalInputs, r: EvalRecipe, entries: list[ModelEntry], rows: list[dict]) -> dict:
    """The text metrics of data.completions scored as given (token counts, where the file has none, by the
    first model's tokenizer); their rows are appended to `rows`."""
    from ..engine.tokenizer import load_tokenizer

    res: dict[str, Any] = {"role": "completions", "source": r.data.completions.path}
    counted = "length" in r.metrics or "reward" in r.metrics  # reward: its correlation with the token count
    if counted and any(g.n_tokens is None for g in inputs.given):
        tok = load_tokenizer(entries[0].section)  # token counts by the first model's tokenizer
        for g in inputs.given:
            if g.n_tokens is None:
                g.n_tokens = len(tok(g.completion, add_special_tokens=False)["input_ids"])
    res.update(text_metrics(inputs.given, inputs, r, rows, inputs.given_name))
    return res


def _build_rewards(r: EvalRecipe, base_dir: Path, entries: list[ModelEntry], rt, warn=None):
    """The recipe's reward sources, tokenizing with the first model's tokenizer."""
    from ..engine.tokenizer import load_tokenizer
    from ..reward_sources import build_rewards

    return build_rewards(
        r.rewards, base_dir=base_dir, tokenizer=load_tokenizer(entries[0].section), device=rt.device, warn=warn
    )


def load_reference(r: EvalRecipe, ref_section, rt, log: Log) -> tuple:
    """The KL reference, loaded once and kept for every model: (policy, tokenizer, first-batch check); warns
    where the sampling settings make the KL estimate approximate."""
    from ..engine.guard import first_batch_check
    from ..engine.models import PolicyLM
    from .loading import load_lm

    log.info(f"reference: {r.reference.display_name()}")
    ref_lm, ref_tok = load_lm(ref_section, rt, seed=r.reference.seed)
    ref_policy = PolicyLM(ref_lm, rt)
    ref_check = first_batch_check(ref_policy, ref_section.on_mismatch, log.warn, "the reference's first KL batch")
    for w in kl_warnings(r):
        log.warn(w)
    return ref_policy, ref_tok, ref_check


def model_results(
    e: ModelEntry, r: EvalRecipe, rt, inputs: EvalInputs, ref, gen_wanted: bool, log: Log, rows, env=None
):
    """One model loaded: its perplexity, its completions (None when nothing is sampled) and the metrics of
    them, KL to the reference included, and (`env`: the environment's factory and the rewards) its episodes in
    the recipe's environment; its rows are appended to `rows`."""
    import torch

    from ..engine.guard import first_batch_check
    from ..engine.models import PolicyLM
    from ..engine.personal import policy_users
    from .generation import Generator
    from .loading import load_lm

    log.info(f"{e.role} {e.name}: {e.section.path or 'random init (' + e.section.init.architecture + ')'}")
    lm, tok = load_lm(e.section, rt, seed=e.spec.seed)
    policy = PolicyLM(lm, rt)
    check = first_batch_check(policy, e.section.on_mismatch, log.warn, f"model '{e.name}''s first batch")
    res: dict[str, Any] = {"role": e.role, "model": e.section.path or "init"}
    outs = None
    if "perplexity" in r.metrics:
        res["perplexity"] = perplexity_for(policy, lm, tok, inputs, r, rt, e.name, log, rows, check)
    if gen_wanted:
        torch.manual_seed(r.seed)  # every model samples from the same seed
        # a personalised policy generates each row's completion for its user (their token before the prompt)
        users = policy_users(e.section.path) if e.section.path and Path(e.section.path).is_dir() else None
        gen = Generator(lm, tok, r.generation, rt.device, autocast=rt.autocast, warn=log.warn, users=users)
        who = f", each for its user ({len(users)} users)" if users and inputs.users else ""
        log.info(f"  generating {len(inputs.prompts)} completions (max {r.generation.max_new_tokens} new tokens){who}")
        outs = gen.generate(inputs.prompts, users=inputs.users if users else None)
        if users:
            res["personalised"] = True
        ks = None
        if "kl" in r.metrics and ref is not None:
            res["kl"], ks = kl_for(policy, tok, ref, outs, r, rt, e.name, check)
        res.update(text_metrics(outs, inputs, r, rows, e.name))
        if ks is not None:
            for row, k in zip(_gen_rows(rows, e.name), ks):
                row["kl"], row["k3"] = k
        del gen
    if env is not None:
        from .env import env_results

        torch.manual_seed(r.seed)  # every model samples from the same seed, on the same tasks
        log.info(f"  playing {r.env.eval_episodes} episodes in {env[0].name}")
        res["env"] = env_results(env[0], lm, tok, r, rt, env[1], rows, e.name)
    del policy, lm
    return res, outs


def kl_for(policy, tok, ref, outs, r: EvalRecipe, rt, name: str, check=None) -> tuple[dict, list]:
    """KL of the model's completions to the reference's (k1 and k3 per completion, at the sampling
    temperature), and each completion's (k1, k3). `ref`: (its PolicyLM, tokenizer, start-up guard); `check`: the
    model's start-up guard (engine.guard.first_batch_check)."""
    from .scoring import completion_logprobs

    if ref[1].get_vocab() != tok.get_vocab():
        raise UsageError(
            f"kl: model '{name}' and the reference have different tokenizers; KL needs both to score the same tokens"
        )
    T = r.generation.temperature
    prompt_ids, token_ids = [g.prompt_ids for g in outs], [g.token_ids for g in outs]
    bs = r.generation.batch_size
    lp = completion_logprobs(policy, prompt_ids, token_ids, T, bs, tok.pad_token_id, rt.device, check)
    lr = completion_logprobs(ref[0], prompt_ids, token_ids, T, bs, tok.pad_token_id, rt.device, ref[2])
    ks = [M.kl_estimates(a, b) for a, b in zip(lp, lr)]
    kl = {
        "k1": _mean([k[0] for k in ks]),
        "k3": _mean([k[1] for k in ks]),
        "k1_per_token": sum(k[0] for k in ks) / max(1, sum(len(a) for a in lp)),
        "reference": r.reference.display_name(),
        "temperature": T,
        "samples": len(ks),
    }
    return kl, ks


def reward_results(rewards, gens: dict, inputs: EvalInputs, r: EvalRecipe, results: dict, rows, log: Log) -> None:
    """Every model's completions scored by the rewards (reward), and compared with the baseline's (win_rate)."""
    log.info("scoring completions with the rewards")
    base_name = r.baseline.display_name() if r.baseline is not None else None
    scored = {}
    for name, outs in gens.items():
        total, parts = rewards.score(inputs.prompts, [g.completion for g in outs], users=inputs.users)
        scored[name] = total
        if "reward" in r.metrics:
            results[name]["reward"] = {
                "mean": _mean(total),
                "std": _std(total),
                "parts": {k: _mean(v) for k, v in parts.items()},
                "length_correlation": M.length_correlation(total, [g.tokens for g in outs], "tokens"),
                **per_user(total, inputs.users, _mean, "mean"),
            }
        for row in _gen_rows(rows, name):
            i = row["index"]
            row["reward"] = total[i]
            for k, v in parts.items():
                row[f"reward/{k}"] = v[i]
    if "win_rate" in r.metrics and inputs.given is None:
        for name in gens:
            if name == base_name:
                continue
            w = M.win_rate(scored[name], scored[base_name], r.win_rate.bootstrap_samples, r.win_rate.confidence, r.seed)
            outcomes = M.win_outcomes(scored[name], scored[base_name])
            lc = M.length_controlled_win_rate(
                outcomes,
                [M.word_count(g.completion) for g in gens[name]],
                [M.word_count(g.completion) for g in gens[base_name]],
                r.win_rate.bootstrap_samples,
                r.win_rate.confidence,
                r.seed,
            )
            results[name]["win_rate"] = {
                **w,
                "baseline": base_name,
                "length_controlled": {**lc, "unit": "words"},
                **per_user(outcomes, inputs.users, _mean, "win_rate"),
            }
            for row in _gen_rows(rows, name):
                row["win"] = outcomes[row["index"]]


def completions_override(path: str | None) -> list[str]:
    """--completions FILE|-: the --set that points data.completions at it (a file relative to here)."""
    if path is None:
        return []
    if path != "-":
        if not Path(path).is_file():
            raise UsageError(f"--completions: no such file: {path} (give a JSONL file, or - for stdin)")
        path = str(Path(path).resolve())
    return ["data.completions.path=" + json.dumps(path)]


def report_to_trackers(r: EvalRecipe, run_dir: Path, rows: list[dict], summary: dict, log: Log) -> None:
    """log.report_to: every number of the summary, and each model's completions as a table."""
    if not r.log.report_to:
        return
    from ..engine.trackers import flatten, start_trackers

    trackers = start_trackers(r.log, "eval", run_dir, r.model_dump(mode="json"), dump_recipe(r), log.warn)
    trackers.log(0, flatten(summary["models"], sep="/"))  # e.g. sft/bleu/score, sft/win_rate/win_rate
    for name in summary["models"]:
        gen = [row for row in _gen_rows(rows, name)]
        if gen:
            cols = ["prompt", "completion"] + [c for c in ("reference", "reward", "tokens") if c in gen[0]]
            trackers.table(0, f"completions/{name}", cols, [[row.get(c) for c in cols] for row in gen])
    trackers.summary(summary)
    trackers.finish(summary["status"])


def _gen_rows(rows: list[dict], name: str):
    return (row for row in rows if row["kind"] == "generation" and row["model"] == name)


def _mean(v):
    return sum(v) / len(v) if v else math.nan


def _std(v):
    if not v:
        return math.nan
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def text_metrics(outs, inputs: EvalInputs, r: EvalRecipe, rows: list[dict], name: str) -> dict:
    """BLEU, ROUGE, distinct-n and lengths of one model's completions; one examples.jsonl row each."""
    res: dict[str, Any] = {}
    hyps = [g.completion for g in outs]
    per = [
        {
            "kind": "generation",
            "model": name,
            "index": i,
            "prompt": g.prompt,
            "completion": g.completion,
            "finish_reason": g.finish_reason,
            "tokens": g.tokens,
            "words": M.word_count(g.completion),
        }
        for i, g in enumerate(outs)
    ]
    if inputs.users is not None:
        for row, u in zip(per, inputs.users):
            row["user"] = u
    if r.generation.require:
        for row, g in zip(per, outs):
            row["missing"] = g.missing
    if inputs.references is not None:
        for row, ref in zip(per, inputs.references):
            row["reference"] = ref
    if "bleu" in r.metrics:
        res["bleu"] = M.bleu(hyps, inputs.references)
        for row, s in zip(per, M.sentence_bleu(hyps, inputs.references)):
            row["bleu"] = s
    if "rouge" in r.metrics:
        rg = M.rouge(hyps, inputs.references, r.rouge.tokenizer)
        res["rouge"] = {**rg["mean"], "tokenizer": r.rouge.tokenizer, "use_stemmer": False, "measure": "f"}
        for row, s in zip(per, rg["per_example"]):
            row.update(s)
    if "distinct" in r.metrics:
        res["distinct"] = {f"distinct-{n}": M.distinct_n(hyps, n) for n in r.distinct.n}
    if "length" in r.metrics:
        finish: dict[str, int] = {}
        for g in outs:
            finish[g.finish_reason] = finish.get(g.finish_reason, 0) + 1
        res["length"] = {
            "tokens": M.length_stats([g.tokens for g in outs]),
            "words": M.length_stats([M.word_count(h) for h in hyps]),
            "finish_reason": finish,
        }
        if r.generation.require:
            res["length"]["missing_keywords"] = sum(1 for g in outs if g.missing)
    rows.extend(per)
    return res


def per_user(values: list[float], users: list[str | None] | None, reduce, key: str) -> dict:
    """{per_user: {user: reduce(its values)}, worst_user: {user, <key>}} over the rows that have a user; {} when none
    has one. The worst user is the one with the lowest value (reward mean, win rate, accuracy)."""
    if not users or all(u is None for u in users):
        return {}
    groups: dict[str, list[float]] = {}
    for v, u in zip(values, users):
        if u is not None:
            groups.setdefault(u, []).append(v)
    table = {u: reduce(v) for u, v in sorted(groups.items())}
    worst = min(table, key=lambda u: table[u])
    return {"per_user": table, "worst_user": {"user": worst, key: table[worst]}}


def preference_for(rewards, pairs, rows: list[dict], users: list[str | None] | None = None) -> dict:
    prompts = [str(p) for p in pairs["prompt"]]
    chosen = [str(c) for c in pairs["chosen"]]
    rejected = [str(c) for c in pairs["rejected"]]
    tc, pc = rewards.score(prompts, chosen, users=users)
    tr, pr = rewards.score(prompts, rejected, users=users)
    out = {"total": M.preference_accuracy(tc, tr)}
    if users is not None:
        correct = [M.pair_correct(a - b) for a, b in zip(tc, tr)]
        out["total"].update(per_user(correct, users, _mean, "accuracy"))
    wc, wr = [M.word_count(c) for c in chosen], [M.word_count(c) for c in rejected]
    out["total"]["chosen_longer"] = sum(1 for a, b in zip(wc, wr) if a > b) / len(wc)
    out["total"]["length_correlation"] = M.length_correlation(tc + tr, wc + wr, "words")
    if len(pc) > 1:
        for k in pc:
            out[k] = M.preference_accuracy(pc[k], pr[k])
    for i in range(len(prompts)):
        rows.append(
            {
                "kind": "pair",
                "index": i,
                "prompt": prompts[i],
                "chosen": chosen[i],
                "rejected": rejected[i],
                "reward_chosen": tc[i],
                "reward_rejected": tr[i],
                "correct": tc[i] > tr[i],
                **({"user": users[i]} if users is not None else {}),
            }
        )
    return out
