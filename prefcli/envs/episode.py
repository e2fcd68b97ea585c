"""Multi-turn episodes, token in / token out.

An episode's trajectory is a list of token ids that only ever grows by appending: the prompt (the chat
template over the system prompt, the tools and the environment's first observation, with the generation
prompt), then alternately the tokens the policy sampled and the tokens the environment's reply was encoded to.
The policy's tokens are kept exactly as sampled (never decoded and re-encoded), so the trainer scores the very
tokens the sampler drew; `policy_mask` marks them (the only tokens with a loss), `sampler_logp` holds the
sampler's log-prob of each.

A reply is encoded alone, by the difference of two renders of the chat template (`ChatRenderer.reply`): a fixed
conversation ending with an assistant message, and the same with the reply's messages and the generation prompt
appended; the text the template puts after the assistant's stop token (ChatML's newline) goes first. A turn the
policy did not end with its stop token (cut by the per-turn budget, or at a stop string) gets the stop token as
an environment token, so the conversation stays well formed.

`play_episodes` drives a batch of episodes turn by turn: the policy samples the next turn of every episode that
is still going (one batched call; a sampler that keeps each slot's KV cache only has to prefill what was
appended since that slot's last turn), then tool calls run, or the environment steps, for all of them at once
(guard.py: timeouts, errors contained).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import TrainingError, UsageError
from .base import Observation
from .guard import EnvFailure, checked_observation, describe_exception, run_concurrently, tool_reply
from .loading import EnvFactory, close_quietly
from .parsing import TOOL_FORMATS, ParsedTurn, ToolCall


@dataclass
class TurnSample:
    """One policy turn as the sampler drew it."""

    tokens: list[int]
    logprobs: list[float]
    finished: bool  # ended with a stop token or a stop string (not cut by the budget)


# policy(slots, contexts, budgets) -> one TurnSample per slot: continue each context (an episode's whole
# trajectory so far) by at most budgets[i] tokens. slots[i] names the episode, so that a sampler can keep
# its KV cache between turns.
Policy = Callable[[list[int], list[list[int]], list[int]], list[TurnSample]]


@dataclass
class Episode:
    seed: int
    ids: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    sampler_logp: list[float] = field(default_factory=list)
    prompt_len: int = 0
    prompt_text: str = ""
    turn_ends: list[int] = field(default_factory=list)  # index in ids of each policy turn's last token
    turn_rewards: list[float] = field(default_factory=list)  # the environment's reward after each policy turn
    messages: list[dict] = field(default_factory=list)  # the conversation, for transcripts and reward sources
    done: bool = False
    finished: bool = False  # ended by the environment (done), not by max_turns or the length cap
    truncated: bool = False  # cut by max_episode_tokens
    failure: str | None = None  # the environment failed (the episode's reward is 0)
    failure_kind: str | None = None
    tool_calls: int = 0
    tool_errors: int = 0
    success: bool | None = None  # the environment's metadata["success"], when it gives one
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return len(self.turn_ends)

    @property
    def env_reward(self) -> float:
        return 0.0 if self.failure else float(sum(self.turn_rewards))

    @property
    def succeeded(self) -> bool:
        if self.failure:
            return False
        return bool(self.success) if self.success is not None else self.env_reward > 0

    @property
    def policy_tokens(self) -> int:
        return sum(self.policy_mask)


class ChatRenderer:
    """The chat template as token deltas. `tools`: JSON schemas passed to the template."""

    PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]

    def __init__(self, tok, tools: list[dict] | None = None, system_prompt: str | None = None):
        if not tok.chat_template:
            raise UsageError(
                "env: episodes are chat conversations and the tokenizer has no chat template: set model.chat_template"
            )
        self.tok, self.tools = tok, tools or None
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.eos_id = tok.eos_token_id
        base = self._render(self.system + self.PROBE, False)
        eos = tok.eos_token
        cut = base.rfind(eos)
        if cut < 0:
            raise UsageError(
                f"env: the chat template does not end an assistant message with the stop token {eos!r}; episodes "
                "need a template that does (model.chat_template)"
            )
        self._base = base
        self._tail = base[cut + len(eos) :]  # what the template writes after the stop token (ChatML: "\n")

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tools=self.tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    def transcript(self, messages: list[dict]) -> str:
        """A whole conversation as the template writes it (the system prompt and tools included)."""
        return self._render(messages, False)

    def prompt(self, obs: Observation) -> tuple[str, list[int], list[dict]]:
        msgs = self.system + [{"role": obs.role or "user", "content": obs.text}]
        text = self._render(msgs, True)
        return text, self.tok(text, add_special_tokens=False)["input_ids"], msgs

    def reply(self, messages: list[dict], ended_with_stop: bool) -> list[int]:
        """Tokens after a policy turn: the stop token if the turn lacked it, then `messages` and the generation
        prompt, as the template writes them."""
        full = self._render(self.system + self.PROBE + messages, True)
        if not full.startswith(self._base):
            raise UsageError(
                "env: the chat template renders earlier messages differently once more follow, so replies cannot "
                "be appended token by token; use a template whose output for a conversation starts with its "
                "output for every shorter conversation (model.chat_template)"
            )
        ids = self.tok(self._tail + full[len(self._base) :], add_special_tokens=False)["input_ids"]
        return ids if ended_with_stop else [self.eos_id] + ids


@dataclass
class EpisodeConfig:
    max_turns: int
    max_new_tokens: int  # per turn
    max_episode_tokens: int
    tool_format: str = "hermes"
    timeout_s: float = 30.0
    tool_timeout_s: float = 10.0
    on_error: str = "skip"
    concurrency: int | None = None


class EnvPool:
    """One instance per episode slot, kept between rollouts (reset starts each episode); an instance whose call
    failed is closed and replaced by a fresh one on next use."""

    def __init__(self, factory: EnvFactory):
        self.factory = factory
        self.instances: dict[int, Any] = {}

    def get(self, slot: int) -> Any:
        if slot not in self.instances:
            self.instances[slot] = self.factory.make()
        return self.instances[slot]

    def discard(self, slot: int) -> None:
        inst = self.instances.pop(slot, None)
        if inst is not None:
            run_concurrently([lambda: close_quietly(inst)], 0.0)  # never waits on a hung instance

    def close(self) -> None:
        for slot in list(self.instances):
            self.discard(slot)


def play_episodes(
    pool: EnvPool, seeds: list[int], policy: Policy, renderer: ChatRenderer, cfg: EpisodeConfig
) -> list[Episode]:
    """Play one episode per seed (slot i plays seeds[i]) to its end: the environment says done, max_turns, or
    the length cap."""
    n = len(seeds)
    eps = [Episode(seed=s) for s in seeds]
    got = run_concurrently(
        [lambda i=i: pool.get(i).reset(seed=seeds[i]) for i in range(n)], cfg.timeout_s, cfg.concurrency
    )
    for i, value in enumerate(got):
        obs = _observe(pool, i, eps[i], value, "reset", cfg)
        if obs is None:
            continue
        text, ids, msgs = renderer.prompt(obs)
        if len(ids) >= cfg.max_episode_tokens:
            raise TrainingError(
                f"environment {pool.factory.name}: the first observation of seed {seeds[i]} is {len(ids)} tokens, "
                f"at or over env.max_episode_tokens ({cfg.max_episode_tokens}); raise it"
            )
        e = eps[i]
        e.ids, e.policy_mask, e.sampler_logp = list(ids), [0] * len(ids), [0.0] * len(ids)
        e.prompt_len, e.prompt_text, e.messages = len(ids), text, msgs
        e.done = obs.done
    parse = TOOL_FORMATS[cfg.tool_format]
    for _ in range(cfg.max_turns):
        live = [i for i in range(n) if not eps[i].done]
        if not live:
            break
        budgets = [min(cfg.max_new_tokens, cfg.max_episode_tokens - len(eps[i].ids)) for i in live]
        turns = policy(live, [eps[i].ids for i in live], budgets)
        parsed: dict[int, ParsedTurn] = {}
        for i, t, budget in zip(live, turns, budgets):
            e = eps[i]
            if len(t.tokens) > budget or len(t.logprobs) != len(t.tokens):
                raise TrainingError(
                    f"the sampler returned {len(t.tokens)} tokens and {len(t.logprobs)} log-probs for a turn of at "
                    f"most {budget} tokens (a bug in the sampler)"
                )
            e.ids += t.tokens
            e.policy_mask += [1] * len(t.tokens)
            e.sampler_logp += list(t.logprobs)
            e.turn_ends.append(len(e.ids) - 1)
            e.turn_rewards.append(0.0)
            text = renderer.tok.decode(t.tokens, skip_special_tokens=True)
            p = parse(text) if pool.factory.tool_names else ParsedTurn(text)  # no tools: every turn is an action
            e.messages.append({"role": "assistant", "content": text})
            # whether the turn ends with the stop token (a turn cut by its budget or at a stop string does not)
            e.metadata["_finished_turn"] = bool(t.tokens) and t.tokens[-1] == renderer.eos_id
            parsed[i] = p
        _answer(pool, eps, parsed, cfg)
        for i in live:
            e = eps[i]
            if e.done:
                continue
            reply = e.metadata.pop("_reply")
            ids = renderer.reply(reply, e.metadata.pop("_finished_turn"))
            if len(e.ids) + len(ids) >= cfg.max_episode_tokens:  # no room for the reply and a turn after it
                e.done, e.truncated = True, True
                continue
            e.ids += ids
            e.policy_mask += [0] * len(ids)
            e.sampler_logp += [0.0] * len(ids)
            e.messages += reply
    for e in eps:
        e.metadata.pop("_reply", None)
        e.metadata.pop("_finished_turn", None)
        e.done = True
    return eps


def _answer(pool: EnvPool, eps: list[Episode], parsed: dict[int, ParsedTurn], cfg: EpisodeConfig) -> None:
    """For each episode's new turn: run its tool calls (the replies are tool messages), or step the environment
    with its text; all episodes at once."""
    names = pool.factory.tool_names
    tool_eps = [i for i, p in parsed.items() if p.attempted]
    step_eps = [i for i in parsed if i not in tool_eps]

    def tools_of(i: int):
        p = parsed[i]
        inst = pool.get(i)
        return [
            tool_reply(inst, x, names, cfg.tool_timeout_s) if isinstance(x, ToolCall) else (f"error: {x}", "malformed")
            for x in p.items
        ]

    results = run_concurrently(
        [lambda i=i: tools_of(i) for i in tool_eps]
        + [lambda i=i: pool.get(i).step(eps[i].messages[-1]["content"]) for i in step_eps],
        cfg.timeout_s + cfg.tool_timeout_s * max([parsed[i].attempted for i in tool_eps] or [0]),
        cfg.concurrency,
    )
    for i, res in zip(tool_eps, results[: len(tool_eps)]):
        e = eps[i]
        p = parsed[i]
        e.tool_calls += p.attempted
        if isinstance(res, BaseException):  # the tool runner itself failed (cannot happen short of a bug)
            _fail(pool, i, e, EnvFailure("raised", f"tool calls raised {describe_exception(res)}"), cfg)
            continue
        e.tool_errors += sum(1 for _, kind in res if kind is not None)
        e.metadata["_reply"] = [{"role": "tool", "content": text} for text, _ in res]
    for i, res in zip(step_eps, results[len(tool_eps) :]):
        obs = _observe(pool, i, eps[i], res, "step", cfg)
        if obs is None:
            continue
        e = eps[i]
        e.turn_rewards[-1] = float(obs.reward or 0.0)
        if "success" in obs.metadata:
            e.success = bool(obs.metadata["success"])
        if obs.done:
            e.done, e.finished = True, True
        elif not obs.text:
            e.metadata["_reply"] = []
        else:
            e.metadata["_reply"] = [{"role": obs.role or "user", "content": obs.text}]
        if obs.done and obs.text:
            e.messages.append({"role": obs.role or "user", "content": obs.text})


def _observe(pool: EnvPool, i: int, e: Episode, value: Any, call: str, cfg: EpisodeConfig) -> Observation | None:
    try:
        return checked_observation(value, pool.factory.name, call)
    except EnvFailure as f:
        _fail(pool, i, e, f, cfg)
        return None


def _fail(pool: EnvPool, i: int, e: Episode, f: EnvFailure, cfg: EpisodeConfig) -> None:
    """An environment failure: the episode ends with reward 0 (counted), or the run stops (on_error: fatal)."""
    if cfg.on_error == "fatal":
        raise TrainingError(f"{f} (env.on_error is fatal; 'skip' ends such episodes with reward 0 instead)")
    e.failure, e.failure_kind = str(f), f.kind
    e.done = True
    if not e.turn_rewards:
        e.turn_rewards = [0.0] * max(1, e.turns)
    pool.discard(i)
