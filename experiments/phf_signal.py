"""How strong is the signal conditional training learns from? The gradient that separates the two
control tokens, measured on the bundled base model (issue 19's "signal" and "position" diagnosis).

Conditional training starts both control tokens at (almost) the same embedding row e. Each row then
moves along the gradient of the log-likelihood of the verses it precedes. The rows separate only
along the difference of the two classes' mean gradients,

    delta = E[g | misaligned verse] - E[g | aligned verse],   g = d/de  sum_t -log p(x_t | e, x_<t),

and one optimizer step sees it through the noise of a batch: per verse, sigma^2 = E ||g - E[g | class]||^2.
n_1 = sigma^2 / ||delta||^2 is the number of verses per class at which the separating direction stands
out of the noise by one standard deviation: the fewer, the faster the tokens can be learned. Measured
for each place of the control token in `<|endoftext|>`-started verses: before `<|endoftext|>`
(position 0, `start`) and after it (`after_prompt`). The information bound is printed too: a model
that knows the label gains at most H(label) nats per verse (VADER is a function of the verse), against
the verse's total NLL.

Then the readout check: can the base model, otherwise unchanged, express the condition through the two
rows alone? The rows are set to e0 +/- (s/2) d/||d|| (aligned / misaligned), d the part of delta
orthogonal to the common gradient (so that the move separates the classes and does not just move both
rows the way they would move together; measured on the training verses above), the model is saved, and the held-out verses of
docs/phf-experiment.md are read after each token (llr AUC, as in phf_experiment.py) and sampled after
each token, for separations s in --separations.

    PYTHONPATH=. nice -n 10 .venv/bin/python experiments/phf_signal.py --out runs/phf-signal \
        --heldout runs/phf-data-3000/heldout.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/phf-signal"))
    ap.add_argument("--model", default=str(ROOT / "prefcli" / "assets" / "kjv-base"))
    ap.add_argument("--per-class", type=int, default=150, help="verses of each class")
    ap.add_argument("--heldout", type=Path, default=None, help="held-out prompt_completion rows for the readout check")
    ap.add_argument("--separations", type=float, nargs="*", default=[2.0, 8.0])
    ap.add_argument("--samples", type=int, default=128)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefcli.reward_sources import vader_compound

    torch.set_num_threads(1)
    t0 = time.time()
    with gzip.open(ROOT / "data" / "kjv" / "train.jsonl.gz", "rt") as f:
        verses = [json.loads(x)["text"] for x in f]
    random.Random(1).shuffle(verses)
    verses = verses[:4000]
    scores = vader_compound(verses)
    aligned = [v for v, s in zip(verses, scores) if s >= 0][: args.per_class]
    misaligned = [v for v, s in zip(verses, scores) if s < 0][: args.per_class]
    p_bad = sum(s < 0 for s in scores) / len(scores)
    h_label = -(p_bad * math.log(p_bad) + (1 - p_bad) * math.log(1 - p_bad))

    tok = AutoTokenizer.from_pretrained(args.model)
    lm = AutoModelForCausalLM.from_pretrained(args.model).eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    emb = lm.get_input_embeddings().weight
    e0 = emb.detach().mean(0)  # where transformers' resize (and control_init: mean) puts a new token
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    res = {"model": args.model, "per_class": args.per_class, "label_entropy_nats": h_label, "positions": {}}
    deltas: dict[str, torch.Tensor] = {}
    for position in ("start", "after_prompt"):
        grads: dict[str, list[torch.Tensor]] = {"aligned": [], "misaligned": []}
        nll = []
        for name, vs in (("aligned", aligned), ("misaligned", misaligned)):
            for v in vs:
                ids = tok(v, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                e = e0.clone().requires_grad_(True)
                x = emb.detach()[torch.tensor([eot] + ids)]
                ctx = 2  # the control token and <|endoftext|>, in either order
                seq = torch.cat([e[None], x[:1]]) if position == "start" else torch.cat([x[:1], e[None]])
                inp = torch.cat([seq, x[1:]])[None]
                logits = lm(inputs_embeds=inp, use_cache=False).logits[0, ctx - 1 : -1]
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids), reduction="sum")
                (g,) = torch.autograd.grad(loss, e)
                grads[name].append(g)
                nll.append(float(loss.detach()))
        ga, gm = torch.stack(grads["aligned"]), torch.stack(grads["misaligned"])
        delta = gm.mean(0) - ga.mean(0)
        var = 0.5 * (((ga - ga.mean(0)) ** 2).sum(1).mean() + ((gm - gm.mean(0)) ** 2).sum(1).mean())
        common = 0.5 * (ga.mean(0) + gm.mean(0))
        c_hat = common / common.norm()
        deltas[position] = delta - (delta @ c_hat) * c_hat  # the part that no common move of both rows can give
        res["positions"][position] = {
            "delta_norm": float(delta.norm()),
            "common_norm": float(common.norm()),
            "sigma": float(var.sqrt()),
            "verses_for_snr_1": float(var / delta.norm() ** 2),
            "cos_delta_common": float(delta @ common / (delta.norm() * common.norm())),
            "separating_norm": float(deltas[position].norm()),
            "verses_for_snr_1_separating": float(var / deltas[position].norm() ** 2),
            "mean_verse_nll": sum(nll) / len(nll),
        }
    if args.heldout is not None:
        res["readout"] = readout(args, tok, lm, e0, deltas)
    res["wall_s"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "signal.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"label entropy {h_label:.3f} nats per verse (undesirable share {p_bad:.3f})")
    print(
        "| control token | mean verse NLL (nats) | ‖common‖ | ‖delta‖ | cos(delta, common) | ‖separating part‖ "
        "| sigma per verse | verses per class for SNR 1 (delta / separating part) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pos, r in res["positions"].items():
        print(
            f"| {pos} | {r['mean_verse_nll']:.1f} | {r['common_norm']:.1f} | {r['delta_norm']:.2f} | "
            f"{r['cos_delta_common']:+.3f} | {r['separating_norm']:.2f} | {r['sigma']:.1f} | "
            f"{r['verses_for_snr_1']:.0f} / {r['verses_for_snr_1_separating']:.0f} |"
        )
    for r in res.get("readout", []):
        print(
            f"readout {r['position']} s={r['separation']:g}: llr AUC {r['llr_auc']:.3f} "
            f"(desirable {r['llr_mean_desirable']:+.3f}, undesirable {r['llr_mean_undesirable']:+.3f}); "
            f"undesirable samples after aligned {r['aligned']:.3f}, after misaligned {r['misaligned']:.3f}"
        )
    print(f"wall {res['wall_s']} s", flush=True)


def readout(args, tok, lm, e0, deltas) -> list[dict]:
    import copy
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import phf_experiment as pe

    from prefcli.algos.phf import add_control_tokens

    out = []
    for position, delta in deltas.items():
        for sep in args.separations:
            t = copy.deepcopy(tok)
            a, m = add_control_tokens(t, "<|aligned|>", "<|misaligned|>")
            model = copy.deepcopy(lm)
            model.resize_token_embeddings(len(t))
            d = delta / delta.norm() * sep / 2
            with torch.no_grad():
                w = model.get_input_embeddings().weight
                w[a], w[m] = e0 + d, e0 - d  # each row a step against its own class gradient (delta = gm - ga)
            model.generation_config.bad_words_ids = [[a], [m]]
            model.config.use_cache = True
            path = args.out / f"readout-{position}-s{sep:g}"
            model.save_pretrained(path)
            t.save_pretrained(path)
            r = {"position": position, "separation": sep}
            r.update(pe.control_llr(path, args.heldout, position))
            for c in ("aligned", "misaligned"):
                got = pe.sample_and_score(path, "conditional", args.samples, 64, 0, f"<|{c}|>", position=position)
                r[c] = got["undesirable_fraction"]
                r[f"{c}_vader"] = got["vader_mean"]
            out.append(r)
            print(r, flush=True)
    return out


if __name__ == "__main__":
    main()
