"""How separable are aligned and misaligned verses for the bundled base model? A linear probe on
kjv-base's hidden states (issue 19's "signal" diagnosis for conditional training).

Each verse is read as `<|endoftext|> verse` (the layout of docs/phf-experiment.md's data); its
feature is the mean of a layer's hidden states over the verse tokens. A logistic regression (torch,
L2-regularised, full-batch L-BFGS) is fitted on training verses and scored on held-out verses
against the VADER label (undesirable = compound < 0). Baselines: the majority class, and the same
probe on a bag of token ids (what VADER, a lexical scorer, can see at most through this tokenizer).

    PYTHONPATH=. nice -n 10 .venv/bin/python experiments/phf_probe.py --out runs/phf-probe

Written by hand instead of with scikit-learn, which the project does not depend on; logistic
regression by L-BFGS is a few lines of torch.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def read(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return [json.loads(x)["text"] for x in f]


def features(lm, tok, texts: list[str], batch: int = 32) -> torch.Tensor:
    """[n, layers + 1, hidden]: the mean hidden state over each verse's tokens, per layer (0 = embeddings)."""
    start = tok("<|endoftext|>", add_special_tokens=False)["input_ids"]
    out = []
    for s in range(0, len(texts), batch):
        enc = [start + tok(t, add_special_tokens=False)["input_ids"][:200] for t in texts[s : s + batch]]
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), tok.pad_token_id)
        mask = torch.zeros(len(enc), T, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        with torch.no_grad():
            hs = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.clone()
        m[:, : len(start)] = 0  # the verse's tokens only
        w = m.unsqueeze(-1).float()
        out.append(torch.stack([(h * w).sum(1) / w.sum(1) for h in hs], 1))
    return torch.cat(out)


def bag_of_tokens(tok, texts: list[str], vocab: int) -> torch.Tensor:
    x = torch.zeros(len(texts), vocab)
    for i, t in enumerate(texts):
        for j in tok(t, add_special_tokens=False)["input_ids"]:
            x[i, j] = 1.0
    return x


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    gt = (pos[:, None] > neg[None, :]).float().mean()
    eq = (pos[:, None] == neg[None, :]).float().mean()
    return float(gt + 0.5 * eq)


def probe(xtr, ytr, xte, yte, l2: float) -> dict:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, ytr.float()) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        s = xte @ w + b
        acc = float(((s > 0).long() == yte).float().mean())
    return {"accuracy": acc, "auc": auc(s.detach(), yte)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/phf-probe"))
    ap.add_argument("--model", default=str(ROOT / "prefcli" / "assets" / "kjv-base"))
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--l2", type=float, default=1e-3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefcli.reward_sources import vader_compound

    torch.set_num_threads(1)
    t0 = time.time()
    tr = read(ROOT / "data" / "kjv" / "train.jsonl.gz")
    random.Random(0).shuffle(tr)
    tr = tr[: args.train]
    te = read(ROOT / "data" / "kjv" / "test.jsonl.gz")
    te = te[:: max(1, len(te) // args.heldout)][: args.heldout]
    ytr = torch.tensor([int(v < 0) for v in vader_compound(tr)])
    yte = torch.tensor([int(v < 0) for v in vader_compound(te)])
    tok = AutoTokenizer.from_pretrained(args.model)
    lm = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ftr, fte = features(lm, tok, tr), features(lm, tok, te)
    res = {
        "model": args.model,
        "train_verses": len(tr),
        "heldout_verses": len(te),
        "heldout_undesirable": float(yte.float().mean()),
        "majority_accuracy": float(max(yte.float().mean(), 1 - yte.float().mean())),
        "layers": {},
    }
    for layer in range(ftr.shape[1]):
        res["layers"][str(layer)] = probe(ftr[:, layer], ytr, fte[:, layer], yte, args.l2)
    V = len(tok)
    res["bag_of_tokens"] = probe(bag_of_tokens(tok, tr, V), ytr, bag_of_tokens(tok, te, V), yte, args.l2)
    res["wall_s"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps(res, indent=2) + "\n")
    print("| features | held-out accuracy | held-out AUC |\n|---|---|---|")
    print(f"| majority class | {res['majority_accuracy']:.3f} | 0.500 |")
    for layer, r in res["layers"].items():
        name = "token embeddings" if layer == "0" else f"layer {layer} (mean over the verse)"
        print(f"| {name} | {r['accuracy']:.3f} | {r['auc']:.3f} |")
    r = res["bag_of_tokens"]
    print(f"| bag of token ids | {r['accuracy']:.3f} | {r['auc']:.3f} |")
    print(f"wall {res['wall_s']} s; held-out undesirable {res['heldout_undesirable']:.3f}", flush=True)


if __name__ == "__main__":
    main()
