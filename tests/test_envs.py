"""The environment side of multi-turn RL (prefcli/envs): tool-call parsing on a table of well-formed and malformed
calls, tools from documented methods, containment of environments that raise, hang or return a reward that is
not finite, replies encoded token by token through the chat template, episodes driven by a scripted policy,
the bundled environments' rules, and the checks that make a bad `env:` exit 2 naming the field."""

from __future__ import annotations

import time

import pytest

from prefcli.envs.episode import ChatRenderer, EnvPool, EpisodeConfig, TurnSample, play_episodes
from prefcli.envs.guard import EnvFailure, checked_observation, run_concurrently
from prefcli.envs.loading import build_factory
from prefcli.envs.parsing import ToolCall, parse_hermes, parse_pythonic
from prefcli.errors import TrainingError, UsageError
from prefcli.recipe.envs import PythonEnv

from .conftest import TOKENIZER

# ------------------------------------------------------------------------------------------- parsing

HERMES = [
    # (text, calls, number of errors, content)
    ("The answer is 5.", [], 0, "The answer is 5."),
    (
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
        [ToolCall("add", {"a": 1, "b": 2})],
        0,
        "",
    ),
    ('Let me look.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', [ToolCall("f", {})], 0, "Let me look."),
    (
        '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {"x": "y"}}</tool_call>',
        [ToolCall("f", {}), ToolCall("g", {"x": "y"})],
        0,
        "",
    ),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', [ToolCall("f", {"a": 1})], 0, ""),
    ('<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', [ToolCall("f", {"a": 1})], 0, ""),
    ('<tool_call>{"name": "f"}</tool_call>', [ToolCall("f", {})], 0, ""),
    # malformed
    ('<tool_call>{"name": "f", "arguments": {}}', [], 1, ""),  # not closed
    ("<tool_call>{name: f}</tool_call>", [], 1, ""),  # not JSON
    ('<tool_call>["f", {}]</tool_call>', [], 1, ""),  # not an object
    ('<tool_call>{"arguments": {}}</tool_call>', [], 1, ""),  # no name
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', [], 1, ""),  # arguments not an object
    ('<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>', [], 1, ""),  # arguments: bad JSON string
    ("</tool_call>", [], 1, ""),  # closing tag alone
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>broken</tool_call>', [ToolCall("f", {})], 1, ""),
]

PYTHONIC = [
    ("The answer is 5.", [], 0, "The answer is 5."),
    ("[add(a=1, b=2)]", [ToolCall("add", {"a": 1, "b": 2})], 0, ""),
    ('[f(), g(x="y", z=[1, 2])]', [ToolCall("f", {}), ToolCall("g", {"x": "y", "z": [1, 2]})], 0, ""),
    ("[1, 2, 3]", [], 0, "[1, 2, 3]"),  # a list that holds no call is plain text
    # malformed
    ("[add(a=1, b=2)", [], 1, ""),  # not closed
    ("[add(a=1,, b=2)]", [], 1, ""),  # syntax
    ("[add(1, 2)]", [], 1, ""),  # positional
    ("[add(a=x)]", [], 1, ""),  # not a literal
    ("[obj.method(a=1)]", [], 1, ""),  # not a plain name
    ("[f(), 3]", [ToolCall("f", {})], 1, ""),
]


@pytest.mark.parametrize("text,calls,errors,content", HERMES)
def test_hermes_table(text, calls, errors, content):
    p = parse_hermes(text)
    assert p.calls == calls and len(p.errors) == errors and p.content == content, p


@pytest.mark.parametrize("text,calls,errors,content", PYTHONIC)
def test_pythonic_table(text, calls, errors, content):
    p = parse_pythonic(text)
    assert p.calls == calls and len(p.errors) == errors and p.content == content, p


# --------------------------------------------------------------------------------------------- tools


def _factory(path: str, **args):
    return build_factory(PythonEnv(kind="python", path=path, args=args))


def test_tool_schemas_come_from_signatures_and_docstrings():
    f = _factory("tests.env_cases:Calc")
    assert f.tool_names == ["add", "crash", "slow"]
    add = f.tools[0]["function"]
    assert add["name"] == "add" and add["description"] == "Add two integers."
    assert add["parameters"]["properties"] == {
        "a": {"type": "integer", "description": "The first."},
        "b": {"type": "integer", "description": "The second."},
    }
    assert add["parameters"]["required"] == ["a", "b"]
    assert _factory("tests.env_cases:Counter").tool_names == []  # reset/step are never tools


def test_tool_calls_that_go_wrong_are_messages_to_the_model():
    from prefcli.envs.guard import tool_reply
    from tests.env_cases import Calc

    env, names = Calc(), ["add", "crash", "slow"]
    assert tool_reply(env, ToolCall("add", {"a": 2, "b": 3}), names, 5) == ("5", None)
    assert tool_reply(env, ToolCall("add", {"a": "2", "b": 3}), names, 5) == ("5", None)  # lax: "2" is 2
    text, kind = tool_reply(env, ToolCall("sub", {}), names, 5)
    assert kind == "unknown_tool" and "unknown tool 'sub'" in text and "add, crash, slow" in text
    text, kind = tool_reply(env, ToolCall("add", {"a": "two", "b": 3}), names, 5)
    assert kind == "bad_arguments" and text.startswith("error: bad arguments for add: a:"), text
    text, kind = tool_reply(env, ToolCall("add", {"a": 1}), names, 5)
    assert kind == "bad_arguments" and "b: Missing required argument" in text
    text, kind = tool_reply(env, ToolCall("add", {"a": 1, "b": 2, "c": 3}), names, 5)
    assert kind == "bad_arguments" and "c: Unexpected keyword argument" in text
    text, kind = tool_reply(env, ToolCall("crash", {}), names, 5)
    assert kind == "raised" and "KeyError" in text and "inside the tool" in text
    t0 = time.monotonic()
    text, kind = tool_reply(env, ToolCall("slow", {}), names, 0.2)
    assert kind == "timeout" and "did not answer within 0.2 s" in text and time.monotonic() - t0 < 5


# ----------------------------------------------------------------------------------- containment


def test_calls_run_concurrently_and_time_out():
    t0 = time.monotonic()
    out = run_concurrently([lambda: time.sleep(0.3) or 1, lambda: time.sleep(0.3) or 2, lambda: time.sleep(9)], 1.0)
    assert out[:2] == [1, 2] and isinstance(out[2], TimeoutError)
    assert time.monotonic() - t0 < 2.0  # the two 0.3 s calls overlapped, the third was left behind at 1 s


@pytest.mark.parametrize(
    "value,kind",
    [
        (RuntimeError("x"), "raised"),
        (TimeoutError("no answer within 1 s"), "timeout"),
        (object(), "bad_return"),
    ],
)
def test_checked_observation_failures(value, kind):
    with pytest.raises(EnvFailure) as e:
        checked_observation(value, "tests.env_cases:X", "step")
    assert e.value.kind == kind and "tests.env_cases:X" in str(e.value)


def test_non_finite_and_non_numeric_rewards():
    from prefcli.envs import Observation

    for reward, kind in ((float("inf"), "nonfinite"), (float("nan"), "nonfinite"), ("high", "bad_return")):
        with pytest.raises(EnvFailure) as e:
            checked_observation(Observation(reward=reward), "E", "step")
        assert e.value.kind == kind
    assert checked_observation(Observation(reward=1), "E", "step").reward == 1.0
    assert checked_observation("hello", "E", "reset").text == "hello"  # a plain string is an observation


# ----------------------------------------------------------------------------------- episodes


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def scripted(tok, script: dict[int, list[str]]):
    """A policy that says script[slot][turn] (plus the stop token), cut to the budget; log-prob -1 per token."""
    turn = {}

    def policy(slots, contexts, budgets):
        out = []
        for s, b in zip(slots, budgets):
            k = turn.get(s, 0)
            turn[s] = k + 1
            ids = tok(script[s][k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = ids[:b]
            out.append(TurnSample(ids, [-1.0] * len(ids), ids[-1] == tok.eos_token_id))
        return out

    return policy


def cfg(**kw):
    base = dict(max_turns=4, max_new_tokens=32, max_episode_tokens=256, timeout_s=2.0, tool_timeout_s=0.5)
    return EpisodeConfig(**{**base, **kw})


def test_replies_are_appended_token_by_token_as_the_template_renders_them(tok):
    """The trajectory decodes to exactly the chat template's rendering of the whole conversation, though each
    reply was encoded alone; the policy's tokens are the sampled ones, masked 1, the rest 0."""
    f = _factory("tests.env_cases:Counter", n=3)
    r = ChatRenderer(tok, system_prompt="Be brief.")
    policy = scripted(tok, {0: ["one", "two", "three"]})
    (e,) = play_episodes(EnvPool(f), [7], policy, r, cfg())
    assert e.finished and e.turns == 3 and e.env_reward == 3.0 and e.succeeded
    msgs = e.messages[:-1]  # the last observation ("end") came with done: the model never reads it
    # (the template writes a newline after the last stop token; the episode ends at the stop token)
    assert tok.decode(e.ids) + "\n" == tok.apply_chat_template(msgs, tokenize=False)
    sampled = [t for t, m in zip(e.ids, e.policy_mask) if m]
    expect = []
    for w in ("one", "two", "three"):
        expect += tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert sampled == expect
    assert [lp for lp, m in zip(e.sampler_logp, e.policy_mask) if m] == [-1.0] * len(expect)
    assert all(lp == 0.0 for lp, m in zip(e.sampler_logp, e.policy_mask) if not m)
    assert e.prompt_text == tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert [e.ids[i] for i in e.turn_ends] == [tok.eos_token_id] * 3


def test_a_turn_cut_by_its_budget_gets_the_stop_token_as_an_environment_token(tok):
    f = _factory("tests.env_cases:Counter", n=2)
    policy = scripted(tok, {0: ["a long answer that goes on and on", "ok"]})
    (e,) = play_episodes(EnvPool(f), [0], policy, ChatRenderer(tok), cfg(max_new_tokens=3))
    first_end = e.turn_ends[0]
    assert e.policy_mask[first_end] == 1 and e.ids[first_end] != tok.eos_token_id
    assert e.ids[first_end + 1] == tok.eos_token_id and e.policy_mask[first_end + 1] == 0
    assert e.finished


def test_length_cap_ends_an_episode_as_truncated(tok):
    f = _factory("tests.env_cases:Counter", n=10)
    policy = scripted(tok, {0: ["word"] * 10})
    (e,) = play_episodes(EnvPool(f), [0], policy, ChatRenderer(tok), cfg(max_episode_tokens=40, max_turns=10))
    assert e.truncated and not e.finished and len(e.ids) <= 40


@pytest.mark.parametrize(
    "path,kind",
    [
        ("tests.env_cases:Raises", "raised"),
        ("tests.env_cases:NonFinite", "nonfinite"),
        ("tests.env_cases:Hangs", "timeout"),
    ],
)
def test_a_failing_environment_ends_its_episode_with_reward_zero(tok, path, kind):
    """Slot 0 plays the misbehaving environment's episode, slot 1 a healthy one in the same batch."""
    bad, good = _factory(path), _factory("tests.env_cases:Counter")
    pool = EnvPool(bad)
    pool.instances[1] = good.make()
    policy = scripted(tok, {0: ["x", "y"], 1: ["x", "y"]})
    t0 = time.monotonic()
    e0, e1 = play_episodes(pool, [0, 1], policy, ChatRenderer(tok), cfg(timeout_s=0.5))
    assert time.monotonic() - t0 < 5
    assert e0.failure_kind == kind and e0.env_reward == 0.0 and not e0.succeeded and e0.turns == 1
    assert path in e0.failure
    assert e1.failure is None and e1.env_reward == 2.0 and e1.finished
    assert 0 not in pool.instances  # the failed instance is dropped; a fresh one serves the next episode


def test_fatal_on_error_stops_the_run_naming_the_environment(tok):
    policy = scripted(tok, {0: ["x"]})
    with pytest.raises(TrainingError, match=r"tests.env_cases:Raises: step raised RuntimeError: the environment"):
        play_episodes(
            EnvPool(_factory("tests.env_cases:Raises")), [0], policy, ChatRenderer(tok), cfg(on_error="fatal")
        )


def test_reset_failure(tok):
    (e,) = play_episodes(
        EnvPool(_factory("tests.env_cases:RaisesOnReset")), [0], scripted(tok, {0: []}), ChatRenderer(tok), cfg()
    )
    assert e.failure_kind == "raised" and e.ids == [] and e.turns == 0


def test_tool_calls_go_to_the_tools_and_errors_are_counted(tok):
    f = _factory("tests.env_cases:Calc")
    script = {
        0: ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>', "5"],
        1: ['<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>oops</tool_call>', "7"],
        2: ['<tool_call>{"name": "crash", "arguments": {}}</tool_call>', "[slow()]", "5"],
    }
    r = ChatRenderer(tok, tools=f.tools)
    e0, e1, e2 = play_episodes(
        EnvPool(f), [0, 1, 2], scripted(tok, script), r, cfg(max_new_tokens=64, tool_timeout_s=0.3)
    )
    assert e0.tool_calls == 1 and e0.tool_errors == 0 and e0.succeeded
    assert e0.messages[-2] == {"role": "tool", "content": "5"} or {"role": "tool", "content": "5"} in e0.messages
    assert e1.tool_calls == 2 and e1.tool_errors == 2 and not e1.succeeded and e1.finished
    tool_msgs = [m["content"] for m in e1.messages if m["role"] == "tool"]
    assert "unknown tool 'nope'" in tool_msgs[0] and "not valid JSON" in tool_msgs[1]
    # hermes format: "[slow()]" is plain text, so the episode's second turn is its answer
    assert e2.tool_calls == 1 and e2.tool_errors == 1 and e2.turns == 2 and not e2.succeeded
    # the tools were rendered into the prompt by the template (here: a tools-aware template is not bundled,
    # so check the renderer passed them: its schema names appear when the template prints them)


def test_bundled_guess_number_rules():
    from prefcli.envs.bundled.guess import GuessNumber

    g = GuessNumber(low=1, high=7, max_guesses=3)
    assert g.reset(seed=11).text == "Guess my number from 1 to 7."
    t = g.target
    assert t == 4 and GuessNumber().reset(seed=11) is not None  # the seed decides the number
    assert g.step("0").text == "Higher: from 1 to 7."
    assert g.step("I say 9").text == "Lower: from 1 to 7."
    last = g.step(str(t))
    assert last.done and last.reward == 1.0 and last.metadata["success"]
    g.reset(seed=11)  # the replies narrow the range
    assert g.step("2").text == "Higher: from 3 to 7."
    assert g.step("6").text == "Lower: from 3 to 5."
    end = g.step("5")
    assert end.done and end.reward == 0.0 and end.text == "No, it was 4." and not end.metadata["success"]
    g.reset(seed=11)
    assert g.step("banana").text == "Say a number from 1 to 7."  # a turn without a number still counts
    d = GuessNumber(hint="direction")
    d.reset(seed=11)
    assert d.step("0").text == "Higher."


def test_bundled_secret_needs_the_tool():
    from prefcli.envs.bundled.secret import SecretNumber

    s = SecretNumber()
    first = s.reset(seed=3)
    assert str(s.secret) not in first.text
    assert s.read_secret() == str(s.secret)
    ok = s.step(f"It is {s.secret}.")
    assert ok.done and ok.reward == 1.0 and ok.metadata == {"success": True, "read_secret_calls": 1}
    s.reset(seed=3)
    assert s.step("0").reward == 0.0
    assert _factory("prefcli.envs.bundled.secret:SecretNumber").tool_names == ["read_secret"]


def test_bundled_simulated_user_rules():
    from prefcli.envs.bundled.dialogue import SimulatedUser

    u = SimulatedUser(turns=3)
    assert u.reset(seed=0).text.startswith("Continue the verse: ")
    assert u.step("yes").text == "Say more than that."
    assert u.step("and the LORD spake unto Moses").text == "What did the LORD do then?"
    end = u.step("and they went out into the field")
    assert end.done and end.reward is None


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "path,args,says",
    [
        ("tests.no_such_module:X", {}, ["env.path", "importing tests.no_such_module failed", "ModuleNotFoundError"]),
        ("tests.env_cases:Nope", {}, ["env.path", "has no 'Nope'"]),
        ("tests.env_cases:NoStep", {}, ["env.path", "NoStep has no step method"]),
        (
            "tests.env_cases:UndocumentedTool",
            {},
            ["env.path", "helper is a public method, so a tool, but has no docstring"],
        ),
        ("tests.env_cases:BadAnnotation", {}, ["env.path", "BadAnnotation.tool cannot be a tool", "Couldn't convert"]),
        ("tests.env_cases:Counter", {"m": 3}, ["env.args", "Counter(n: int = 2) does not accept {'m': 3}"]),
        ("tests.env_cases:NeedsArg", {}, ["env.args", "missing a required argument: 'size'"]),
        (
            "prefcli.envs.bundled.guess:GuessNumber",
            {"low": 5, "high": 2},
            ["env.args", "low (5) must be below high (2)"],
        ),
    ],
)
def test_bad_env_classes_are_usage_errors_naming_the_field(path, args, says):
    with pytest.raises(UsageError) as e:
        _factory(path, **args)
    for s in says:
        assert s in str(e.value), str(e.value)
