"""`prefcli gan`: adversarial preference training.

A discriminator D (a sequence classifier on prompt + completion) learns to tell human/gold
completions from the generator's samples for the same prompts; the generator G learns, by policy
gradient with a KL penalty to its frozen start, to be scored as human. Tokens are discrete, so
G's update cannot back-propagate through D: D's output is G's reward (docs/algorithms.md, section
gan: the APO-style alternation of Cheng et al. 2023).

Losses (ell = D's logit, sigma the logistic function; Goodfellow et al. 2014):
  L_D = -E_real[(1 - eps) log sigma(ell) + eps log(1 - sigma(ell))] - E_gen[log(1 - sigma(ell))]
        (+ bt_weight * Bradley-Terry on preference pairs, + gamma/2 E_real ||grad_emb ell||^2, R1)
  G's reward: log sigma(ell) (the non-saturating L_G = -E[log D(G(x))]) or ell itself.

Schedule: `disc_warmup_steps` D steps on samples of the initial G first; then every rollout is
followed by `disc_steps` D steps (skipped while D's recent accuracy exceeds
`max_disc_accuracy`) and the generator's updates on that rollout. `train.max_steps` counts
generator steps.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.data import load_rows, move
from ..engine.models import build_trained_model, save_hf
from ..engine.pairs import encode_scored, text_batch
from ..engine.run import RunContext
from ..engine.task import Group, Micro, Plan
from ..engine.tokenizer import load_tokenizer
from ..errors import DataError
from ..recipe.sections import ModelSection
from ..reward_sources import RewardSource, build_rewards
from .reward_model import bradley_terry_loss
from .rlhf.build import build_learner


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per real/generated pair: binary cross-entropy with real target 1 - eps and generated target 0
    (one-sided label smoothing, Salimans et al. 2016). -log sigma(x) = softplus(-x)."""
    eps = label_smoothing
    real = (1.0 - eps) * F.softplus(-real_logits) + eps * F.softplus(real_logits)
    return real + F.softplus(fake_logits)


def generator_reward(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """log sigma(ell) (non-saturating: log D(G(x))) or the logit itself."""
    return F.logsigmoid(logits) if kind == "log_sigmoid" else logits


class DiscModule(nn.Module):
    """The classifier as the loop trains it: forward gives one logit per sequence."""

    def __init__(self, model, autocast):
        super().__init__()
        self.model = model
        self.autocast = autocast

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        with self.autocast():
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False
            )
        return out.logits[:, 0].float()


class DiscriminatorSource(RewardSource):
    """The generator's reward: the discriminator's verdict on prompt + completion."""

    def __init__(self, logits: Callable[[list[str]], torch.Tensor], kind: str, weight: float):
        self.logits, self.kind = logits, kind
        self.name = "discriminator"
        self.weight = weight

    def __call__(self, prompts, completions):
        return generator_reward(self.logits([p + c for p, c in zip(prompts, completions)]), self.kind).tolist()


def discriminator_model_section(r) -> ModelSection:
    """What the discriminator is built from: discriminator.path / .init, else the generator's architecture
    (model.init) or pretrained weights (model.path), with a new score head."""
    d = r.discriminator
    dm = ModelSection(
        path=d.path or (r.model.path if d.init is None and r.model.init is None else None),
        init=d.init or (r.model.init if d.path is None else None),
        tokenizer=d.tokenizer or (None if d.path else (r.model.tokenizer or r.model.path)),
        attn_implementation=r.model.attn_implementation,
        pad_token=r.model.pad_token,
    )
    if dm.path is None and dm.init is None:  # generator from a folder, discriminator from the same folder
        dm = ModelSection(path=r.model.path, tokenizer=dm.tokenizer)
    return dm


class Discriminator:
    """The discriminator side of the game: a score model on prompt + completion, the buffer of the
    generator's recent samples, optional preference pairs, its optimizer group and its balance watch."""

    def __init__(self, ctx: RunContext, gen_tok, prompt_text: list[str], gold: list[str], total_updates: int):
        r, rt = ctx.recipe, ctx.rt
        self.ctx, self.rt, self.cfg = ctx, rt, r
        self.prompt_text, self.gold = prompt_text, gold
        d, g = r.discriminator, r.gan
        dm = discriminator_model_section(r)
        self.tok = load_tokenizer(dm) if (d.path or d.tokenizer) else gen_tok
        # dropout kept: the discriminator is a classifier; no two log-probs of it are compared
        self.model = build_trained_model(
            dm, self.tok, rt, r.train.gradient_checkpointing, r.train.seed + 7, ctx.smoke, head="score", dropout=True
        )
        self.module = DiscModule(self.model, rt.autocast)
        self.pairs = None
        if r.data.pairs is not None:
            pr = load_rows(r.data.pairs, required=["prompt", "chosen", "rejected"], what="data.pairs")
            self.pairs = [
                (
                    encode_scored(self.tok, p + c, r.data.max_length)[0],
                    encode_scored(self.tok, p + x, r.data.max_length)[0],
                )
                for p, c, x in zip(pr["prompt"], pr["chosen"], pr["rejected"])
                if c and x and c != x
            ]
            if not self.pairs:
                raise DataError(f"data.pairs: {r.data.pairs.path}: no usable pair (empty or identical answers)")
        self.group = Group("discriminator", self.module, rt, r.train, max(1, total_updates), lr=d.lr)
        self.samples: deque = deque(maxlen=g.buffer_size)  # (prompt index, generated completion)
        self.steps = 0
        self.acc_ema: float | None = None
        self.high_run = self.flat_run = 0
        self.warned: set[str] = set()
        self.stop_reason: str | None = None
        self._pending_acc: list[torch.Tensor] = []

    def add_samples(self, rows: list[int], completions: list[str]) -> None:
        self.samples.extend(zip(rows, completions))

    def _encode(self, texts: list[str]) -> dict:
        seqs = [encode_scored(self.tok, t, self.cfg.data.max_length)[0] for t in texts]
        return move(text_batch(seqs, self.tok.pad_token_id), self.rt.device)

    @torch.no_grad()
    def logits(self, texts: list[str]) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        out = []
        bs = max(self.cfg.discriminator.batch_size * 2, 8)
        for s in range(0, len(texts), bs):
            out.append(self.module(**self._encode(texts[s : s + bs])))
        self.model.train(was)
        return torch.cat(out)

    # ------------------------------------------------------------------ its step
    def loss(self, module, b) -> tuple[torch.Tensor, dict]:
        g = self.cfg.gan
        n = b["n_pairs"]
        ids, mask = b["input_ids"], b["attention_mask"]
        if g.grad_penalty > 0:
            emb = self.model.get_input_embeddings()(ids[:n]).detach().requires_grad_(True)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):  # double backward needs the plain attention kernel
                real = module(inputs_embeds=emb, attention_mask=mask[:n])
                (grad,) = torch.autograd.grad(real.sum(), emb, create_graph=True)
            penalty = 0.5 * g.grad_penalty * (grad.pow(2).sum(-1) * mask[:n]).sum(-1)
            fake = module(input_ids=ids[n : 2 * n], attention_mask=mask[n : 2 * n])
            rest = module(input_ids=ids[2 * n :], attention_mask=mask[2 * n :]) if ids.shape[0] > 2 * n else None
        else:
            logits = module(input_ids=ids, attention_mask=mask)
            real, fake, rest = logits[:n], logits[n : 2 * n], logits[2 * n :] if ids.shape[0] > 2 * n else None
            penalty = None
        per_pair = discriminator_loss(real, fake, g.label_smoothing)
        correct = ((real > 0).float() + (fake < 0).float()) / 2
        metrics = {
            "disc/accuracy": (correct.sum().detach(), n),
            "disc/real_prob": (torch.sigmoid(real).sum().detach(), n),
            "disc/fake_prob": (torch.sigmoid(fake).sum().detach(), n),
            "disc/gan_loss": (per_pair.sum().detach(), n),
        }
        if penalty is not None:
            per_pair = per_pair + penalty
            metrics["disc/grad_penalty"] = (penalty.sum().detach(), n)
        if rest is not None:
            m = rest.shape[0] // 2
            bt = bradley_terry_loss(rest[:m], rest[m:])
            per_pair = per_pair + g.bt_weight * bt.sum() / n
            metrics["disc/bt_loss"] = (bt.sum().detach(), m)
            metrics["disc/bt_accuracy"] = (((rest[:m] > rest[m:]).float()).sum().detach(), m)
        self._pending_acc.append(correct.detach().mean())
        return per_pair.sum(), metrics

    def next_plan(self) -> Plan:
        """One step: real texts, generated ones for the same prompts, then preference pairs (one micro-batch)."""
        g, d = self.cfg.gan, self.cfg.discriminator
        rng = random.Random(self.cfg.train.seed * 7919 + self.steps)
        pool = list(self.samples)
        picks = [pool[i] for i in rng.sample(range(len(pool)), min(d.batch_size, len(pool)))]
        micro = []
        real = [self.prompt_text[i] + self.gold[i] for i, _ in picks]
        fake = [self.prompt_text[i] + c for i, c in picks]
        texts = real + fake
        pairs = []
        if self.pairs is not None and g.bt_weight > 0:
            pairs = [self.pairs[rng.randrange(len(self.pairs))] for _ in picks]
        seqs = [encode_scored(self.tok, t, self.cfg.data.max_length)[0] for t in texts]
        seqs += [c for c, _ in pairs] + [x for _, x in pairs]
        b = move(text_batch(seqs, self.tok.pad_token_id), self.rt.device)
        b["n_pairs"] = len(picks)
        micro.append(Micro(batch=b, n=len(picks), tokens=int(b["attention_mask"].sum())))
        self.steps += 1
        return Plan(group="discriminator", micro=micro, loss_fn=self.loss, name="disc")

    def watch(self) -> None:
        """Read the last discriminator steps' accuracy (one sync) and warn about a broken balance."""
        if not self._pending_acc:
            return
        accs = torch.stack(self._pending_acc).tolist()
        self._pending_acc = []
        g = self.cfg.gan
        for a in accs:
            self.acc_ema = a if self.acc_ema is None else 0.8 * self.acc_ema + 0.2 * a
            self.high_run = self.high_run + 1 if a >= 0.99 else 0
            past_warmup = self.steps > g.disc_warmup_steps
            self.flat_run = self.flat_run + 1 if (past_warmup and abs(a - 0.5) <= 0.05) else 0
        if self.high_run >= g.saturation_steps and "high" not in self.warned:
            self.warned.add("high")
            self.ctx.warn(
                f"the discriminator has been >= 99% accurate for {self.high_run} steps: log D(x) gives the "
                "generator almost no signal. Raise gan.label_smoothing, lower discriminator.lr, set "
                "gan.max_disc_accuracy, or use gan.generator_reward: logit."
            )
            if g.stop_on_saturation:
                self.stop_reason = f"discriminator saturated for {self.high_run} steps (gan.stop_on_saturation)"
        if self.flat_run >= g.saturation_steps and "flat" not in self.warned:
            self.warned.add("flat")
            self.ctx.warn(
                f"the discriminator has stayed at 50% accuracy for {self.flat_run} steps: it is not learning "
                "to tell real from generated (raise discriminator.lr or its capacity)"
            )

    def gated(self) -> bool:
        """Skip this rollout's discriminator steps: its recent accuracy is above gan.max_disc_accuracy."""
        return self.acc_ema is not None and self.acc_ema > self.cfg.gan.max_disc_accuracy

    def state_dict(self) -> dict:
        return {
            "d_steps": self.steps,
            "acc_ema": self.acc_ema,
            "high_run": self.high_run,
            "flat_run": self.flat_run,
            "warned": sorted(self.warned),
            "samples": list(self.samples),
        }

    def load_state_dict(self, s: dict) -> None:
        self.steps, self.acc_ema = s["d_steps"], s["acc_ema"]
        self.high_run, self.flat_run, self.warned = s["high_run"], s["flat_run"], set(s["warned"])
        self.samples.clear()
        self.samples.extend((int(i), c) for i, c in s["samples"])

    def save(self, out_dir: Path) -> None:
        save_hf(self.model, self.tok, out_dir, self.rt)


# --------------------------------------------------------------------------------- the game


class GANTask:
    """The Task the engine runs for `prefcli gan`: a generator (a PolicyLearner whose reward is the
    discriminator's verdict) and a Discriminator, alternating as the module docstring says."""

    def __init__(self, ctx: RunContext):
        r, rt = ctx.recipe, ctx.rt
        self.ctx, self.rt, self.cfg = ctx, rt, r
        g = r.gan
        # the generator's reward asks the discriminator, built just below, at rollout time
        verdict = DiscriminatorSource(lambda texts: self.disc.logits(texts), g.generator_reward, g.reward_weight)
        self.gen = gen = build_learner(ctx, extra_rewards=[verdict])
        if "completion" not in gen.prompts.train_rows.column_names:
            raise DataError(
                f"data.train: {r.data.train.path}: gan needs a 'completion' column with the human/gold "
                f"answer (columns: {', '.join(gen.prompts.train_rows.column_names)}); map yours with "
                "data.train.columns, e.g. {completion: answer}"
            )
        gold = list(gen.prompts.train_rows["completion"])
        for i, text in enumerate(gold):
            if not text:
                raise DataError(f"data.train: {r.data.train.path}: row {i + 1} has an empty 'completion'")
        self.eval_gold = (
            list(gen.prompts.eval_rows["completion"])
            if gen.prompts.eval_rows is not None and "completion" in gen.prompts.eval_rows.column_names
            else []
        )
        self.g_total = gen.total_updates
        rollouts = math.ceil(self.g_total / gen.shape.steps_per_rollout)
        d_total = g.disc_warmup_steps + rollouts * g.disc_steps
        self.disc = Discriminator(ctx, gen.tok, gen.prompts.text, gold, d_total)
        self._total = self.g_total + d_total  # an upper bound: gated discriminator steps are skipped
        self.groups = {"policy": gen.group, "discriminator": self.disc.group}
        self.g_steps = 0
        self.eval_sources = (
            build_rewards(g.eval_rewards, tokenizer=gen.tok, device=rt.device) if g.eval_rewards else None
        )

    def total_steps(self) -> int:
        return self._total

    def plans(self, start_step: int) -> Iterator[Plan]:
        g, gen, disc = self.cfg.gan, self.gen, self.disc
        while self.g_steps < self.g_total and disc.stop_reason is None:
            disc.watch()
            if disc.stop_reason is not None:
                break
            if disc.steps < g.disc_warmup_steps:  # warm-up: samples of the initial generator, no generator update
                if len(disc.samples) < min(self.cfg.discriminator.batch_size, g.buffer_size):
                    smp = gen.sample_train()
                    disc.add_samples(smp.rows, smp.completions)
                yield disc.next_plan()
                continue
            if gen.needs_rollout():
                exp = gen.rollout()  # rewards from the current discriminator; the samples join its buffer
                disc.add_samples(exp.rows, exp.completions)
                for _ in range(0 if disc.gated() else g.disc_steps):
                    yield disc.next_plan()
            self.g_steps += 1
            yield gen.next_plan()

    def state_dict(self) -> dict:
        self.disc.watch()
        return {**self.gen.state_dict(), "gan": {"g_steps": self.g_steps, **self.disc.state_dict()}}

    def load_state_dict(self, state: dict, extra: dict) -> None:
        self.gen.load_state_dict(state, extra)
        self.g_steps = state["gan"]["g_steps"]
        self.disc.load_state_dict(state["gan"])

    def extra_tensors(self) -> dict:
        return self.gen.extra_tensors()

    def has_eval(self) -> bool:
        return self.gen.has_eval()

    @torch.no_grad()
    def evaluate(self) -> dict:
        out = self.gen.evaluate()  # eval/reward (discriminator + extra rewards), eval/kl, eval/length
        if not self.gen.prompts.eval_ids:
            return out
        rt = self.rt
        idx, prompts, completions = self.gen.eval_samples()
        fake = self.disc.logits([p + c for p, c in zip(prompts, completions)])
        sums = {"eval/disc_fake_prob": float(torch.sigmoid(fake).sum())}
        n = float(len(prompts))
        if self.eval_gold:
            real = self.disc.logits([self.gen.prompts.eval_text[i] + self.eval_gold[i] for i in idx])
            sums["eval/disc_accuracy"] = float(((real > 0).float().sum() + (fake < 0).float().sum()) / 2)
        if self.eval_sources is not None:
            _, parts = self.eval_sources.score(prompts, completions)
            for name, vals in parts.items():
                sums[f"eval/{name}"] = float(sum(vals))
        names = sorted(sums)
        t = rt.all_reduce(torch.tensor([sums[k] for k in names] + [n], dtype=torch.float64, device=rt.device)).tolist()
        out.update({k: v / t[-1] for k, v in zip(names, t[:-1])})
        return out

    def startup_check(self) -> None:
        """The generator's guard runs on the first completions it samples (PolicyLearner.startup_check)."""

    def describe(self) -> dict:
        d = self.gen.describe()
        d["gan"] = {
            "generator_steps": self.g_steps,
            "discriminator_steps": self.disc.steps,
            "discriminator_accuracy_ema": self.disc.acc_ema,
            "stopped": self.disc.stop_reason,
            "warnings": sorted(self.disc.warned),
        }
        return d

    def save_final(self, out_dir: Path) -> None:
        self.gen.save_final(out_dir)  # the generator, in Hugging Face format
        self.disc.save(Path(out_dir) / "discriminator")


def build(ctx: RunContext) -> GANTask:
    return GANTask(ctx)
