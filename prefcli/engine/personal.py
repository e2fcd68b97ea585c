"""Personalised reward models: a shared reward model plus a conditioning module that makes it each user's.

Every kind scores user u as the shared model plus a user-specific linear term on the same hidden state:

    r_u(x, y) = w . h(x, y) + b  +  v(s_u) . h(x, y)

h(x, y) is the last hidden state at the last real token of `prompt + completion` (what the shared head w, b
reads), s_u the user's *state* and v(s) = M s its head offset, linear in the state:

| kind | state s_u | offset v(s) | a user seen in training | a new user from K labelled pairs |
|---|---|---|---|---|
| user_embedding (P-RLHF-style, Li et al. 2024) | e_u in R^d | e_u | a learned vector (random at the start) | e fitted by L-BFGS, shared part frozen, penalty lambda ||e||^2 |
| latent (VPL-style, Poddar et al. 2024) | z_u in R^k | W z_u | the encoder's mean on K of their training pairs | the encoder's mean on the K pairs: no fitting |
| lowrank (LoRe/PAL-style, Bose et al. 2025; Chen et al. 2024) | w_u in the simplex (B) | V^T w_u: sum_b w_ub r_b | softmax of learned logits | logits fitted by L-BFGS, basis frozen |

An unknown user has state 0, hence offset 0: the shared model, which is a plain transformers reward model
(`final/` loads with AutoModelForSequenceClassification alone). The user part is stored beside it in
`final/personalisation/` (`save`, `load`): config.json (kind, dimensions, the user ids in order) and
model.safetensors (the module's parameters, `user_states` [U, state] and `user_offsets` [U, d]: each known
user's head offset, all a scorer needs to serve them).

The latent encoder follows VPL's language-model architecture: each labelled pair (chosen, rejected) becomes
MLP([h_chosen; h_rejected]); one self-attention layer over the user's pairs; the mean over pairs; linear maps to
the mean and log-variance of q(z | pairs) = N(mu, diag sigma^2). VPL's decoder is an MLP on [h; z]; here the
decoder is the bilinear h . W z, so that z = 0 (the prior mean, an unknown user) gives the shared model. The
encoder reads the hidden states of the context pairs without gradient (VPL's reference code reads embeddings
of a frozen model): the reward loss alone trains the shared model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("user_embedding", "latent", "lowrank")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FOLDER = "personalisation"


# ---------------------------------------------------------------------------------------- kinds


class Conditioner(nn.Module):
    """The user part of a personalised reward model (see the module docstring)."""

    kind: str

    def __init__(self, users: list[str], hidden: int, spec: dict):
        super().__init__()
        self.users = list(users)
        self.hidden = hidden
        self.spec = dict(spec)

    @property
    def state_dim(self) -> int:
        raise NotImplementedError

    def offsets(self, states: torch.Tensor) -> torch.Tensor:
        """Head offsets v(s) [N, d] of states [N, state_dim] (float32)."""
        raise NotImplementedError

    def known_states(self) -> torch.Tensor:
        """States of the users seen in training [U, state_dim] (with gradient while training)."""
        raise NotImplementedError

    def fit(self, hc: torch.Tensor, hr: torch.Tensor, shared_margin: torch.Tensor) -> torch.Tensor:
        """The state of a user not seen in training from K labelled pairs: hidden states of the chosen and the
        rejected completions [K, d] and the shared model's margins [K]. K = 0 gives the zero state. Fitting runs
        on the CPU in float64 (K is small); the latent encoder runs where its weights are."""
        raise NotImplementedError

    def config(self) -> dict:
        return {"kind": self.kind, "hidden_size": self.hidden, "users": self.users, **self.spec}

    def offsets_device(self) -> torch.device:
        """Where `offsets` computes (its parameters' device; the CPU for the user embedding's identity map)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def _lbfgs(params: list[torch.Tensor], loss_fn, steps: int = 60) -> None:
    """Minimise a smooth convex-ish loss of a few parameters (a new user's vector or weights): L-BFGS with a
    strong-Wolfe line search, deterministic."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


class UserEmbeddingCond(Conditioner):
    """e_u = u_u (dim null: a vector of the hidden size per user) or e_u = P u_u (dim k: k numbers per user, P a
    shared d x k map, so that users share the directions they read)."""

    kind = "user_embedding"

    def __init__(self, users, hidden, spec):
        super().__init__(users, hidden, spec)
        k = spec.get("dim") or hidden
        self.proj = nn.Parameter(torch.randn(k, hidden) / math.sqrt(hidden + 1)) if spec.get("dim") else None
        # each user starts random, its head drawn like the shared head (N(0, 1/(d+1))) or its k numbers N(0, 1):
        # started at 0, every user's head would be the shared one, the users' rows would push the shared model in
        # cancelling directions, and a taste it does not encode yet would never be learned (measured:
        # docs/personalisation.md)
        scale = 1.0 if self.proj is not None else 1.0 / math.sqrt(hidden + 1)
        self.table = nn.Parameter(torch.randn(len(users), k) * scale)

    @property
    def state_dim(self) -> int:
        return self.table.shape[1]

    def offsets(self, states):
        return states if self.proj is None else states @ self.proj.float()

    def known_states(self):
        return self.table.float()

    def fit(self, hc, hr, shared_margin):
        e = torch.zeros(self.state_dim, dtype=torch.float64)
        if hc.shape[0] == 0:
            return e.float()
        e.requires_grad_(True)
        dh = (hc - hr).double().cpu()
        if self.proj is not None:  # the user's k numbers, read through the shared map
            dh = dh @ self.proj.detach().double().cpu().T
        m = shared_margin.double().cpu()
        lam = float(self.spec.get("fit_l2", 1.0))
        _lbfgs([e], lambda: F.softplus(-(m + dh @ e)).sum() + lam * (e * e).sum())
        return e.detach().float()


class LowRankCond(Conditioner):
    kind = "lowrank"

    def __init__(self, users, hidden, spec):
        super().__init__(users, hidden, spec)
        rank = int(spec["rank"])
        self.basis = nn.Parameter(torch.randn(rank, hidden) / math.sqrt(hidden + 1))  # B heads, like the shared one
        self.logits = nn.Parameter(torch.randn(len(users), rank))

    @property
    def state_dim(self) -> int:
        return self.basis.shape[0]

    def offsets(self, states):
        return states @ self.basis.float()

    def known_states(self):
        return torch.softmax(self.logits.float(), dim=-1)

    def fit(self, hc, hr, shared_margin):
        B = self.basis.shape[0]
        if hc.shape[0] == 0:
            return torch.zeros(B)
        a = torch.zeros(B, dtype=torch.float64, requires_grad=True)
        basis = self.basis.detach().double().cpu()
        per_head = (hc - hr).double().cpu() @ basis.T  # [K, B]: each basis head's margin
        m = shared_margin.double().cpu()
        lam = float(self.spec.get("fit_l2", 0.01))
        _lbfgs([a], lambda: F.softplus(-(m + per_head @ torch.softmax(a, -1))).sum() + lam * (a * a).sum())
        return torch.softmax(a.detach(), -1).float()


class LatentCond(Conditioner):
    kind = "latent"

    def __init__(self, users, hidden, spec):
        super().__init__(users, hidden, spec)
        k, e = int(spec["latent_dim"]), int(spec["encoder_dim"])
        self.pair = nn.Sequential(nn.Linear(3 * hidden, e), nn.GELU(), nn.Linear(e, e))
        self.attn = nn.MultiheadAttention(e, num_heads=1, batch_first=True)
        self.mu = nn.Linear(e, k)
        self.logvar = nn.Linear(e, k)
        # q starts narrow (sigma = e^-2): with sigma = 1 the sampled z's noise swamps the margins of the first steps
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, -4.0)
        self.W = nn.Parameter(torch.randn(k, hidden) / math.sqrt(hidden + 1))
        # the seen users' latent means, refreshed from their training pairs before each evaluation and save
        self.register_buffer("user_z", torch.zeros(len(users), k), persistent=True)

    @property
    def state_dim(self) -> int:
        return self.W.shape[0]

    def offsets(self, states):
        return states @ self.W.float()

    def known_states(self):
        return self.user_z.float()

    def encode(self, hc: torch.Tensor, hr: torch.Tensor, group: torch.Tensor, n_groups: int):
        """q(z | pairs) of each group of pairs: (mu, logvar) [G, k]. hc, hr [C, d]; group [C] in 0..G-1."""
        x = self.pair(torch.cat([hc, hr, hc - hr], -1).to(self.mu.weight.dtype))  # [C, e]
        counts = torch.bincount(group, minlength=n_groups)
        width = int(counts.max())
        # pairs laid out [G, width] with a padding mask: one attention call for every group
        order = torch.argsort(group, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(group.numel(), device=group.device) - starts[group[order]]
        padded = x.new_zeros(n_groups, width, x.shape[-1])
        padded[group[order], slot] = x[order]
        pad = torch.arange(width, device=group.device)[None, :] >= counts[:, None]
        y, _ = self.attn(padded, padded, padded, key_padding_mask=pad, need_weights=False)
        y = y.masked_fill(pad[..., None], 0.0).sum(1) / counts.clamp_min(1)[:, None]
        return self.mu(y).float(), self.logvar(y).float()

    def fit(self, hc, hr, shared_margin):
        if hc.shape[0] == 0:
            return torch.zeros(self.state_dim)
        dev = self.mu.weight.device
        with torch.no_grad():
            mu, _ = self.encode(hc.to(dev), hr.to(dev), torch.zeros(hc.shape[0], dtype=torch.long, device=dev), 1)
        return mu[0].float()


CONDITIONERS: dict[str, type[Conditioner]] = {
    "user_embedding": UserEmbeddingCond,
    "latent": LatentCond,
    "lowrank": LowRankCond,
}


def make_conditioner(kind: str, users: list[str], hidden: int, spec: dict) -> Conditioner:
    return CONDITIONERS[kind](users, hidden, spec)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row: 1/2 sum (exp(logvar) + mu^2 - 1 - logvar)."""
    return 0.5 * (logvar.exp() + mu * mu - 1.0 - logvar).sum(-1)


# ---------------------------------------------------------------------------------------- model


def score_head(model):
    from .models import unwrap_lm

    inner = unwrap_lm(model)
    head = getattr(inner, "score", None) or getattr(inner, "classifier", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no score head")
    return head


def last_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state the reward head reads: the transformer body's last hidden state at the last real token
    of each right-padded row, float32 [N, d]."""
    from .models import unwrap_lm

    body = unwrap_lm(model).base_model
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(1) - 1
    return out[torch.arange(out.shape[0], device=out.device), last].float()


def shared_score(model, h: torch.Tensor) -> torch.Tensor:
    head = score_head(model)
    return head(h.to(head.weight.dtype))[:, 0].float()


class PersonalReward(nn.Module):
    """The trained module of a personalised reward model: the transformers reward model and the conditioner, one
    module so that DDP's hooks and FSDP's units see every parameter, and every computation goes through
    `forward`. `forward(batch)` returns the shared scores, each row's personal scores and the summed KL of the
    latent contexts (0 for the other kinds)."""

    def __init__(self, model, cond: Conditioner, autocast=None):
        super().__init__()
        self.model = model
        self.cond = cond
        self.__dict__["autocast"] = autocast

    def hidden(self, input_ids, attention_mask):
        import contextlib

        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            return last_hidden(self.model, input_ids, attention_mask)

    def forward(self, batch: dict) -> dict:
        h = self.hidden(batch["input_ids"], batch["attention_mask"])
        shared = shared_score(self.model, h)
        kl = h.new_zeros(())
        if "offsets" in batch:  # scoring with given head offsets (evaluation, new users)
            offsets = batch["offsets"]
        elif "ctx_ids" in batch:  # latent, training: each group's z sampled from q(z | its context pairs)
            with torch.no_grad():
                hx = self.hidden(batch["ctx_ids"], batch["ctx_mask"])
            C = hx.shape[0] // 2
            mu, logvar = self.cond.encode(hx[:C], hx[C:], batch["ctx_group"], batch["n_groups"])
            z = mu + torch.exp(0.5 * logvar) * batch["eps"]
            kl = gaussian_kl(mu, logvar).sum()
            offsets = self._rows(self.cond.offsets(z), batch["row_group"])
        else:  # known users by index (-1: no user, the shared model)
            offsets = self._rows(self.cond.offsets(self.cond.known_states()), batch["user"])
        personal = shared + (h * offsets).sum(-1)
        if self.training:  # every parameter in the graph of every step (DDP expects it), whichever path ran
            kl = kl + 0.0 * sum(p.sum() for p in self.cond.parameters())
        return {"shared": shared, "personal": personal, "kl": kl, "hidden": h}

    @staticmethod
    def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = table[index.clamp_min(0)]
        return rows * (index >= 0).to(rows.dtype)[:, None]


# ----------------------------------------------------------------------------------- storage


def save(folder: Path, cond: Conditioner, states: torch.Tensor, extra: dict | None = None) -> None:
    """final/personalisation/: config.json and model.safetensors (the module, user_states, user_offsets)."""
    from safetensors.torch import save_file

    folder = Path(folder) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"module.{k}": v.detach().cpu().clone().contiguous() for k, v in cond.state_dict().items()}
    with torch.no_grad():
        tensors["user_states"] = states.detach().float().cpu().clone().contiguous()
        tensors["user_offsets"] = cond.offsets(states.float()).detach().cpu().clone().contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = {**cond.config(), **(extra or {}), "state_dim": cond.state_dim}
    (folder / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")


def is_personalised(model_dir: str | Path) -> bool:
    return (Path(model_dir) / FOLDER / CONFIG_NAME).is_file()


class Loaded:
    """A saved user part: the conditioner (to fit new users), the known users and their head offsets."""

    def __init__(self, cond: Conditioner, states: torch.Tensor, offsets: torch.Tensor, config: dict):
        self.cond, self.states, self.offsets, self.config = cond, states, offsets, config
        self.index = {u: i for i, u in enumerate(cond.users)}


def load(model_dir: str | Path) -> Loaded:
    from safetensors.torch import load_file

    folder = Path(model_dir) / FOLDER
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    kind = cfg.get("kind")
    if kind not in CONDITIONERS:
        raise ValueError(f"{folder / CONFIG_NAME}: unknown personalisation kind {kind!r} (known: {', '.join(KINDS)})")
    spec = {k: v for k, v in cfg.items() if k not in ("kind", "hidden_size", "users", "state_dim")}
    cond = make_conditioner(kind, cfg["users"], int(cfg["hidden_size"]), spec)
    t = load_file(str(folder / WEIGHTS_NAME))
    cond.load_state_dict({k[len("module.") :]: v for k, v in t.items() if k.startswith("module.")})
    cond.eval()
    return Loaded(cond, t["user_states"], t["user_offsets"], cfg)


# ------------------------------------------------------------------------------------ policies
#
# A personalised policy is a causal LM whose tokenizer has one special token per user, `<|user:ID|>`, put before
# the prompt (after a leading BOS) in training and generation; no token is the generic user (the pooled policy,
# what an unknown user gets). final/personalisation/config.json records {"kind": "user_token", "users": {id:
# token}}; the model itself is a plain transformers causal LM (the tokens are in its tokenizer and embeddings).

POLICY_KIND = "user_token"


def user_token(user: str) -> str:
    return f"<|user:{user}|>"


def add_user_tokens(tok, users: list[str]) -> dict[str, int]:
    """Register each user's token as a special token (kept whole, skipped by decode(skip_special_tokens=True));
    the model's embeddings are resized to len(tok) when it is built. Returns {user: token id}."""
    new = [user_token(u) for u in users if user_token(u) not in tok.get_vocab()]
    if new:
        extra = [t for t in (getattr(tok, "extra_special_tokens", None) or []) if isinstance(t, str)]
        tok.add_special_tokens({"extra_special_tokens": extra + new})
    out = {}
    for u in users:
        i = tok.convert_tokens_to_ids(user_token(u))
        if i is None or i == tok.unk_token_id or tok.convert_ids_to_tokens(i) != user_token(u):
            raise ValueError(f"could not add the user token {user_token(u)!r} to the tokenizer")
        out[u] = int(i)
    return out


def with_user(prompt_ids: list[int], token_id: int | None, bos_id: int | None) -> list[int]:
    """The prompt with the user's token first (after a leading BOS); unchanged for no user (token_id None)."""
    if token_id is None:
        return list(prompt_ids)
    lead = 1 if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id else 0
    return list(prompt_ids[:lead]) + [token_id] + list(prompt_ids[lead:])


def save_policy_users(folder: Path, tokens: dict[str, int], tok, extra: dict | None = None) -> None:
    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"kind": POLICY_KIND, "users": {u: user_token(u) for u in tokens}, **(extra or {})}
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")


def policy_users(model_dir: str | Path) -> dict[str, str] | None:
    """{user: token text} of a personalised policy's folder, or None for a policy that is not personalised."""
    p = Path(model_dir) / FOLDER / CONFIG_NAME
    if not p.is_file():
        return None
    cfg = json.loads(p.read_text())
    return dict(cfg["users"]) if cfg.get("kind") == POLICY_KIND else None
