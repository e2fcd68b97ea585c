"""Each adapter against a real instance from its package: an OpenEnv server started on 127.0.0.1 in the test
(openenv-core's own server app, uvicorn), a reasoning-gym dataset with its own verifier, a TextArena game. Each
is skipped, with the reason, only where its package is not installed (pip install 'prefcli[openenv]', ...)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from prefcli.envs.episode import ChatRenderer, EnvPool, EpisodeConfig
from prefcli.envs.loading import build_factory
from prefcli.errors import UsageError
from prefcli.recipe.envs import OpenEnvEnv, ReasoningGymEnv, TextArenaEnv

from .conftest import TOKENIZER
from .test_envs import scripted


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def cfg(**kw):
    base = dict(max_turns=12, max_new_tokens=32, max_episode_tokens=2048, timeout_s=20.0, tool_timeout_s=1.0)
    return EpisodeConfig(**{**base, **kw})


def play(factory, seeds, script, tok, **kw):
    from prefcli.envs.episode import play_episodes

    return play_episodes(EnvPool(factory), seeds, scripted(tok, script), ChatRenderer(tok), cfg(**kw))


# ------------------------------------------------------------------------------------------ OpenEnv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def openenv_server():
    pytest.importorskip(
        "openenv.core.env_server", reason="openenv-core is not installed (pip install 'prefcli[openenv]')"
    )
    uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")
    from openenv.core.env_server import Action, Environment, Observation, State, create_fastapi_app

    class Say(Action):
        message: str

    class Heard(Observation):
        text: str = ""

    class Countdown(Environment):
        """Ends when told 'stop' (reward 1), or after 3 steps (reward 0); the seed shows in the first text."""

        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self):
            super().__init__()
            self.n, self._state = 0, State()

        def reset(self, seed=None, episode_id=None, **kw):
            self.n = 0
            return Heard(text=f"Say stop (task {seed}).")

        def step(self, action, timeout_s=None, **kw):
            self.n += 1
            if "stop" in action.message:
                return Heard(text="stopped", done=True, reward=1.0)
            return Heard(text=f"heard {action.message}", done=self.n >= 3, reward=0.0)

        @property
        def state(self):
            return self._state

    app = create_fastapi_app(Countdown, Say, Heard, max_concurrent_envs=8)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the OpenEnv server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow  # importing openenv-core's server (it brings gradio) takes 5-20 s
def test_openenv_server_episodes(openenv_server, tok):
    f = build_factory(OpenEnvEnv(kind="openenv", url=openenv_server))
    e0, e1 = play(f, [5, 6], {0: ["hello", "stop now"], 1: ["a", "b", "c", "d"]}, tok)
    assert e0.messages[0]["content"] == "Say stop (task 5)." and e1.messages[0]["content"] == "Say stop (task 6)."
    assert e0.finished and e0.env_reward == 1.0 and e0.turns == 2 and e0.succeeded
    assert {"role": "user", "content": "heard hello"} in e0.messages
    assert e1.finished and e1.env_reward == 0.0 and e1.turns == 3 and not e1.succeeded


def test_openenv_no_server_is_a_usage_error_naming_the_url():
    pytest.importorskip("openenv.core.generic_client", reason="openenv-core is not installed")
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(UsageError, match=r"env.url: no OpenEnv server answers at http://127.0.0.1:\d+"):
        build_factory(OpenEnvEnv(kind="openenv", url=url, timeout_s=2))


# ------------------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_dataset_and_its_verifier(tok):
    rg = pytest.importorskip(
        "reasoning_gym", reason="reasoning-gym is not installed (pip install 'prefcli[reasoning-gym]')"
    )
    f = build_factory(ReasoningGymEnv(kind="reasoning_gym", dataset="basic_arithmetic", args={"max_terms": 2}))
    entry = rg.create_dataset("basic_arithmetic", seed=11, size=1, max_terms=2)[0]
    right, wrong = str(entry["answer"]), "no idea"
    e_ok, e_bad = play(f, [11, 11], {0: [right], 1: [wrong]}, tok)
    assert e_ok.messages[0]["content"] == entry["question"]
    assert e_ok.env_reward == 1.0 and e_ok.succeeded and e_ok.turns == 1 and e_ok.finished
    assert e_bad.env_reward == 0.0 and not e_bad.succeeded
    # the reward is the dataset's own verifier
    data = rg.create_dataset("basic_arithmetic", seed=11, size=1, max_terms=2)
    assert data.score_answer(wrong, data[0]) == e_bad.env_reward


def test_reasoning_gym_names_are_checked():
    pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed")
    with pytest.raises(
        UsageError,
        match=r"env.dataset: reasoning-gym has no dataset 'basic_arithmetik' \(did you mean 'basic_arithmetic'\?\)",
    ):
        build_factory(ReasoningGymEnv(kind="reasoning_gym", dataset="basic_arithmetik"))
    with pytest.raises(UsageError, match=r"env.args: basic_arithmetic does not accept \{'colour': 'red'\}"):
        build_factory(ReasoningGymEnv(kind="reasoning_gym", dataset="basic_arithmetic", args={"colour": "red"}))


# ---------------------------------------------------------------------------------------- TextArena


def test_textarena_guess_the_number_by_halving(tok):
    pytest.importorskip("textarena", reason="textarena is not installed (pip install 'prefcli[textarena]')")
    f = build_factory(TextArenaEnv(kind="textarena", id="GuessTheNumber-v0"))
    inst = f.make()
    first = inst.reset(seed=3)
    assert "Guess The Number" in first.text
    lo, hi, guesses = 1, 20, 0
    while True:  # the game's replies steer a binary search: it must be won within its 10 turns
        mid = (lo + hi) // 2
        obs = inst.step(f"[{mid}]")
        guesses += 1
        if obs.done:
            break
        assert obs.text in ("The target number is higher.", "The target number is lower.")  # only the new message
        lo, hi = (mid + 1, hi) if "higher" in obs.text else (lo, mid - 1)
    assert obs.reward == 1.0 and obs.metadata["success"] and guesses <= 5
    # and through the episode driver: a model that says nothing valid loses
    (e,) = play(f, [3], {0: ["hmm"] * 12}, tok)
    assert e.finished or e.turns == 12
    assert not e.succeeded


def test_textarena_unknown_game():
    pytest.importorskip("textarena", reason="textarena is not installed")
    with pytest.raises(
        UsageError, match=r"env.id: TextArena has no game 'GuessTheNumbr-v0' \(did you mean 'GuessTheNumber-v0'\?\)"
    ):
        build_factory(TextArenaEnv(kind="textarena", id="GuessTheNumbr-v0"))
