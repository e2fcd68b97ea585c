"""Whom each prompt is for, in `prefcli rlhf` with a user column (data.user_column): the users passed to the
reward sources (a personalised reward model scores each completion for its prompt's user), and, with
rlhf.personalisation, each user's control token before their prompts (engine/personal.py), so that one policy
learns to serve every user. A `generic_fraction` of the training prompts (a fixed, seeded choice) is sampled
without its token: the policy with no token serves the users' average, what an unknown user gets."""

from __future__ import annotations

import random

import torch

from ...engine.personal import add_user_tokens, save_policy_users, with_user
from ...engine.users import find_user_column, missing_user_column, read_users
from ...errors import DataError


class PromptUsers:
    def __init__(self, recipe, tok, rows, eval_rows):
        d, p = recipe.data, recipe.rlhf.personalisation
        self.tok, self.personal = tok, p
        self.column = find_user_column(rows.column_names, d.user_column)
        if self.column is None and (p is not None or d.user_column is not None):
            why = "rlhf.personalisation" if p is not None else "data.user_column"
            raise missing_user_column("data.train", d.train.path, rows.column_names, d.user_column, why)
        self.train = read_users(rows, self.column, d.train.path, "data.train")
        ev_col = self.column if eval_rows is not None and self.column in eval_rows.column_names else None
        self.eval = read_users(eval_rows, ev_col, "data.eval", "data.eval") if eval_rows is not None else []
        self.names = sorted({u for u in self.train if u is not None})
        self.tokens: dict[str, int] = {}
        self.generic: set[int] = set()
        if p is None:
            return
        if not self.names:
            raise DataError(
                f"data.train: {d.train.path}: rlhf.personalisation needs users, but every prompt's "
                f"'{self.column}' is empty"
            )
        try:
            self.tokens = add_user_tokens(tok, self.names)  # before the model is built: its embeddings grow
        except ValueError as e:
            raise DataError(f"data.train: {d.train.path}: {e}") from None
        rng = random.Random(recipe.train.seed + 11)
        self.generic = {i for i in range(len(self.train)) if rng.random() < p.generic_fraction}

    @property
    def active(self) -> bool:
        return self.column is not None

    def condition(self, ids: list[list[int]], split: str) -> list[list[int]]:
        """The prompts' token ids with each one's user token first (a personalised policy; users it was trained
        for, and not the generic training prompts)."""
        if not self.tokens:
            return ids
        users = self.train if split == "train" else self.eval
        out = []
        for i, p in enumerate(ids):
            u = users[i] if i < len(users) else None
            tid = self.tokens.get(u) if u is not None and not (split == "train" and i in self.generic) else None
            out.append(with_user(p, tid, self.tok.bos_token_id))
        return out

    def of(self, split: str, idx: list[int]) -> list[str | None] | None:
        """The users of these prompt indices (None when the prompts have no user column)."""
        if not self.active:
            return None
        users = self.train if split == "train" else self.eval
        return [users[i] for i in idx]

    def per_user(self, totals: list[float], users: list[str | None], rt, device) -> dict[str, float]:
        """eval/reward/<user> and eval/reward_worst_user over every process's held-out prompts (one all-reduce of
        a table with a row per user of the held-out prompts, the same on every process)."""
        names = sorted({u for u in self.eval if u is not None})
        if not names:
            return {}
        index = {u: k for k, u in enumerate(names)}
        table = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
        for v, u in zip(totals, users):
            if u is not None:
                table[index[u], 0] += v
                table[index[u], 1] += 1
        rt.all_reduce(table)
        out = {f"eval/reward/{u}": float(table[k, 0] / table[k, 1]) for k, u in enumerate(names) if table[k, 1] > 0}
        if out:
            out["eval/reward_worst_user"] = min(out.values())
        return out

    def save(self, out_dir, rt) -> None:
        if self.tokens and rt.is_main:
            save_policy_users(out_dir, self.tokens, self.tok, {"user_column": self.column})

    def describe(self) -> dict | None:
        if not self.active:
            return None
        out = {"column": self.column, "train": self.names}
        if self.personal is not None:
            out["generic_prompts"] = len(self.generic)
        return out
