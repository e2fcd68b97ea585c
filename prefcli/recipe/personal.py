"""`reward.personalisation`: a reward model that serves each user (the rater column) instead of their average.

Three kinds, one section each (a discriminated union on `kind`); what they compute is in
prefcli/engine/personal.py and docs/personalisation.md. This module imports only pydantic (`prefcli validate`
must not pay for torch).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from .sections import Section

PERSONALISATION_KINDS = ("user_embedding", "latent", "lowrank")


class _PersonalBase(Section):
    generic_weight: float = Field(
        0.1,
        ge=0,
        le=1,
        description="alpha: the loss is (1 - alpha) x the Bradley-Terry loss of each row's own user + alpha x that "
        "of the shared part alone (P-RLHF's generic user), so the shared part, which scores an unknown user, "
        "learns the pooled preference. 0 = the shared part is only a component of each user's reward.",
    )
    new_user_labels: list[int] = Field(
        default_factory=lambda: [0, 5, 10, 20, 50],
        min_length=1,
        description="The new-user curve: held-out accuracy of users not seen in training given this many of their "
        "own labels (eval/new_user/accuracy@k). Each new user's held-out rows are split into a pool the labels are "
        "drawn from and the rows scored.",
    )
    new_user_draws: int = Field(
        3, gt=0, description="Draws of the k labels per new user and k, averaged (the curve's draws are seeded)."
    )

    @model_validator(mode="after")
    def _check_labels(self):
        if any(k < 0 for k in self.new_user_labels):
            raise ValueError("new_user_labels: counts of labels must be >= 0")
        if len(set(self.new_user_labels)) != len(self.new_user_labels):
            raise ValueError("new_user_labels: a count is listed twice")
        return self


class UserEmbedding(_PersonalBase):
    """P-RLHF-style (Li et al. 2024): a learned vector e_u per user beside the shared model;
    r_u(x, y) = r(x, y) + e_u . h(x, y), h the hidden state the shared head reads (with `dim`, e_u = P u_u). An
    unknown user gets e = 0, the shared model. A new user's vector is fitted from their labels with the shared
    model frozen."""

    kind: Literal["user_embedding"] = Field(description="Per-user embedding.")
    dim: int | None = Field(
        None,
        gt=0,
        description="Numbers per user: null = a vector of the hidden size (e_u itself); k = k numbers u_u mapped "
        "by a shared d x k matrix P (e_u = P u_u), so that users share the directions they read: fewer numbers to "
        "learn per user and to fit for a new one.",
    )
    fit_l2: float = Field(
        1.0,
        ge=0,
        description="L2 penalty lambda ||e||^2 on a new user's vector when it is fitted from a few labels "
        "(the new-user curve, a reward source's `context`): larger keeps it nearer the shared model.",
    )


class Latent(_PersonalBase):
    """VPL-style (Poddar et al. 2024): an encoder summarises K labelled pairs of a user into a latent z ~ q(z | pairs);
    r(x, y, z) = r(x, y) + (W z) . h(x, y); trained on the evidence lower bound (Bradley-Terry likelihood minus
    kl_weight x KL(q || N(0, I))). A new user gets a personalised reward from a few labels without retraining."""

    kind: Literal["latent"] = Field(description="Few-shot latent user.")
    latent_dim: int = Field(8, gt=0, description="Dimension of the latent user z.")
    encoder_dim: int = Field(64, gt=0, description="Width of the pair encoder and its self-attention layer.")
    context_pairs: int = Field(
        16, gt=0, description="At most this many of a user's labelled pairs summarise the user in training."
    )
    min_context_pairs: int = Field(
        2,
        gt=0,
        description="At least this many: each training context holds a number of pairs drawn uniformly between "
        "min_context_pairs and context_pairs, so the encoder learns from few labels and from many.",
    )
    kl_weight: float = Field(
        0.01, ge=0, description="beta of the KL term of the evidence lower bound (per context, not per row)."
    )

    @model_validator(mode="after")
    def _check_context(self):
        if self.min_context_pairs > self.context_pairs:
            raise ValueError(
                f"min_context_pairs ({self.min_context_pairs}) exceeds context_pairs ({self.context_pairs})"
            )
        return self


class LowRank(_PersonalBase):
    """LoRe/PAL-style (Bose et al. 2025; Chen et al. 2024): B basis reward heads shared by everyone and per-user
    mixture weights w_u on the simplex; r_u(x, y) = r(x, y) + sum_b w_ub r_b(x, y). A new user's B weights are
    fitted from their labels with the basis frozen."""

    kind: Literal["lowrank"] = Field(description="Low-rank basis of rewards.")
    rank: int = Field(4, gt=0, description="B, the number of basis reward heads.")
    fit_l2: float = Field(
        0.01, ge=0, description="L2 penalty on a new user's mixture logits when they are fitted from a few labels."
    )


Personalisation = Annotated[UserEmbedding | Latent | LowRank, Field(discriminator="kind")]


class PolicyPersonalisation(Section):
    """A policy conditioned on the user: one learned control token per user (`<|user:ID|>`) before the prompt,
    the way conditional training adds its control tokens. `prefcli generate --user ID` and the eval recipe's
    `user:` (or its prompts' user column) put the token back."""

    kind: Literal["user_token"] = Field(
        "user_token", description="'user_token': one special token per user, its embedding learned."
    )
    generic_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="This share of the training rows (a fixed, seeded choice) is trained without its user's token: "
        "the policy with no token then serves the pooled preference, which is what an unknown user gets "
        "(P-RLHF's generic user).",
    )
