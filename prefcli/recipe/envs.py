"""The `env:` section of `prefcli rlhf` and `prefcli eval`: an environment the policy plays episodes in
(docs/environments.md). `kind` picks where the environment comes from: your Python class (`python`), an OpenEnv
server (`openenv`), a reasoning-gym dataset (`reasoning_gym`) or a TextArena game (`textarena`); the other
fields shape the episodes and are the same for every kind. This module imports only pydantic: importing the
class and checking its methods happens when the run starts (prefcli/envs/loading.py), before anything is written.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .sections import Section

ENV_KINDS = ("python", "openenv", "reasoning_gym", "textarena")
TOOL_FORMATS = ("hermes", "pythonic")  # prefcli/envs/parsing.py TOOL_FORMATS
ENV_ON_ERROR = ("skip", "fatal")


class _EnvBase(Section):
    max_turns: int = Field(
        4, gt=0, description="Most policy turns per episode (a tool call and its reply count as a turn)."
    )
    max_episode_tokens: int = Field(
        256,
        gt=1,
        description="Total length cap of an episode: its prompt, every policy turn and every environment reply, in "
        "tokens. An episode that reaches it ends unfinished (counted in env/truncated; rlhf.overlong_buffer and "
        "rlhf.mask_truncated_completions treat it as DAPO treats an overlong completion). The per-turn budget is "
        "generation.max_new_tokens and the per-turn stop strings generation.stop_strings.",
    )
    system_prompt: str | None = Field(None, description="A system message before the environment's first observation.")
    tool_format: Literal[TOOL_FORMATS] = Field(
        "hermes",
        description='How the model writes tool calls: \'hermes\' (<tool_call>{"name": ..., "arguments": {...}}'
        "</tool_call>, Hermes/Qwen) or 'pythonic' ([name(arg=value)], Llama 3.2/4).",
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Most seconds one reset or step of the environment may take; then the episode ends."
    )
    tool_timeout_s: float = Field(
        10.0, gt=0, description="Most seconds one tool call may take; then the model is told it timed out."
    )
    on_error: Literal[ENV_ON_ERROR] = Field(
        "skip",
        description="An environment call that raises, times out or returns a reward that is not a finite number: "
        "'skip' ends that episode with reward 0 and counts it (env/errors); 'fatal' stops the run (exit 1) "
        "naming the environment.",
    )
    concurrency: int | None = Field(
        None,
        gt=0,
        description="Most environment calls running at once (each in its own thread; calls that wait on I/O "
        "overlap). null: one per episode of the batch.",
    )
    reward_weight: float = Field(
        1.0,
        description="Weight of the environment's reward (the sum of its step rewards) in the episode's reward; "
        "the sources under `rewards:` are added, scored on the final transcript.",
    )
    num_tasks: int = Field(
        100_000,
        gt=0,
        description="Training episodes start from reset(seed) with seeds 0 .. num_tasks-1, in an order shuffled "
        "by train.seed (one seed per group of rlhf.num_generations episodes; an epoch is num_tasks groups).",
    )
    eval_episodes: int = Field(32, gt=0, description="Held-out episodes of each evaluation (eval/success_rate, ...).")
    eval_seed: int = Field(
        1_000_000_000,
        ge=0,
        description="Held-out episodes use seeds eval_seed, eval_seed+1, ... (kept apart from the training seeds).",
    )

    @model_validator(mode="after")
    def _check_seeds(self):
        if self.eval_seed < self.num_tasks:
            raise ValueError(
                f"eval_seed ({self.eval_seed}) is below num_tasks ({self.num_tasks}): held-out episodes would "
                "replay training seeds"
            )
        return self


class PythonEnv(_EnvBase):
    kind: Literal["python"] = Field(
        description="Your class: reset(seed) -> Observation, step(action) -> Observation; its public documented "
        "methods are tools."
    )
    path: str = Field(
        description="'package.module:Class', or 'path/to/file.py:Class' relative to the recipe (the bundled ones: "
        "prefcli.envs.bundled.guess:GuessNumber, ...secret:SecretNumber, ...dialogue:SimulatedUser)."
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the class's constructor.")

    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        mod, sep, attr = value.rpartition(":")
        if not sep or not mod or not attr:
            raise ValueError(f"path must look like 'module:Class' or 'file.py:Class', got '{value}'")
        if mod.endswith(".py"):  # a file: resolved against the recipe's folder, like every path
            path = os.path.expanduser(mod)
            if not os.path.isabs(path):
                path = os.path.join((info.context or {}).get("base_dir") or os.getcwd(), path)
            if not os.path.exists(path):
                raise ValueError(f"no such file: {os.path.abspath(path)}")
            return f"{os.path.abspath(path)}:{attr}"
        return value


class OpenEnvEnv(_EnvBase):
    kind: Literal["openenv"] = Field(
        description="An OpenEnv environment server (openenv-core's HTTP/WebSocket protocol), e.g. one started with "
        "`uvicorn app:app --port 8000`; pip install 'prefcli[openenv]'."
    )
    url: str = Field(description="The server's base URL, e.g. http://127.0.0.1:8000.")
    action_field: str = Field("message", description="The field of the server's action that carries the model's text.")
    observation_field: str | None = Field(
        None,
        description="The field of the server's observation read as text (null: the first string among text, "
        "message, prompt, echoed_message).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError(f"url must start with http:// or https:// (or ws://), got '{value}'")
        return value.rstrip("/")


class ReasoningGymEnv(_EnvBase):
    kind: Literal["reasoning_gym"] = Field(
        description="A reasoning-gym dataset as single-turn episodes: the question is the observation, the "
        "dataset's own verifier (score_answer) the reward; pip install 'prefcli[reasoning-gym]'."
    )
    dataset: str = Field(description="The dataset's name, e.g. basic_arithmetic, leg_counting, chain_sum.")
    args: dict[str, Any] = Field(default_factory=dict, description="The dataset's config (its keyword arguments).")
    answer_regex: str | None = Field(
        None,
        description="The answer is the first group of this regex in the model's text (null: the whole text, stripped).",
    )

    @field_validator("answer_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            import re

            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"answer_regex does not compile: {e}") from None
        return value


class TextArenaEnv(_EnvBase):
    kind: Literal["textarena"] = Field(
        description="A single-player TextArena game (e.g. GuessTheNumber-v0, Wordle-v0): its messages are the "
        "observations, its final reward the reward; pip install 'prefcli[textarena]'."
    )
    id: str = Field(description="The game's id in TextArena's registry, e.g. GuessTheNumber-v0.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of textarena.make.")


EnvSpec = Annotated[PythonEnv | OpenEnvEnv | ReasoningGymEnv | TextArenaEnv, Field(discriminator="kind")]
