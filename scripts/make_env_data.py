"""Data for the bundled environments' recipes (recipes/tiny/*-env-*.yaml), made by playing the environments
themselves (prefcli/envs/bundled) with a policy that knows the format and nothing else:

    python scripts/make_env_data.py          # writes data/tiny/env_*.jsonl

- env_guess_sft.jsonl: games of GuessNumber (1-7, 3 guesses, replies that state the range left): half guess
  uniformly from 1 to 7 whatever the replies say, half guess uniformly inside the range the last reply gave. A
  model that imitates them wins about half the games (0.37 and 0.67 for the two halves, by simulation); the
  RL run has to learn to stay in the range every time and to halve it (which always wins). (With blind guesses
  only, the first version of this file, 300 RL steps on kjv-base did not move the success rate.)
- env_secret_sft.jsonl: episodes of SecretNumber (1-9) rendered as the tool recipe's chat template renders them
  (its tools block as the system turn); half call the tool ([read_secret()], the pythonic format) and half do
  not; half of the calls are followed by the number the tool said, every other answer is a random number. A
  model that imitates them solves about a third of the episodes (0.5 x (0.5 + 0.5/9) + 0.5/9); the RL run has to
  learn to call the tool every time and to repeat what it says. (With random answers after every call, the
  first version of this file, RL on kjv-base dropped the tool within a dozen steps: a call followed by a guess
  wins no more often than a guess, and repeating the tool's number was too rare to be reinforced.) The format SFT
  trained on it (4 epochs, mixed with the other files) calls the tool but does not repeat the number: after a
  call, its answer does not depend on what the tool said (p(secret) 0.11, chance).
- env_secret_read_sft.jsonl: the second SFT stage of the tool task (recipes/tiny/sft-env-secret.yaml, from the
  format SFT): half of the episodes call the tool and answer exactly the number it said, half answer a random
  number without calling. A model that imitates them repeats what it read and calls the tool about half the
  time, so it solves about 0.5 + 0.5/9 = 0.56 of the episodes; the RL run has to learn to call the tool every
  time, which always wins.
- env_dialogue_prefs.jsonl: preference pairs between replies in the simulated user's conversations
  ("Continue the verse: ..."), the rule of data/tiny/pref_*.jsonl: the preferred reply ends ", saith the
  LORD."; one- and two-turn conversations cut from the KJV training verses. `prefcli reward` trains the
  dialogue recipe's reward model on them.

Deterministic: the same corpus gives the same bytes.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefcli.envs.bundled.dialogue import SimulatedUser  # noqa: E402
from prefcli.envs.bundled.guess import GuessNumber  # noqa: E402
from prefcli.envs.bundled.secret import SecretNumber  # noqa: E402

TOOLS_SYSTEM = "Tools: read_secret()"  # what recipes/tiny/rlhf-env-secret.yaml's template writes for its tools
LORD = ", saith the LORD."


def guess_games(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for k in range(n):
        env = GuessNumber(low=1, high=7, max_guesses=3)
        obs = env.reset(seed=10_000_000 + k)  # seeds apart from the RL runs' (0 ..) and their held-out ones
        msgs = [{"role": "user", "content": obs.text}]
        lo, hi = 1, 7
        while True:
            guess = str(rng.randint(lo, hi) if k % 2 == 0 else rng.randint(1, 7))
            msgs.append({"role": "assistant", "content": guess})
            obs = env.step(guess)
            if obs.done:
                break
            msgs.append({"role": "user", "content": obs.text})
            lo, hi = env.lo, env.hi
        rows.append({"messages": msgs})
    return rows


def secret_episodes(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for k in range(n):
        env = SecretNumber(low=1, high=9)
        obs = env.reset(seed=10_000_000 + k)
        msgs = [{"role": "system", "content": TOOLS_SYSTEM}, {"role": "user", "content": obs.text}]
        answer = str(rng.randint(1, 9))
        if k % 2 == 0:
            msgs.append({"role": "assistant", "content": "[read_secret()]"})
            msgs.append({"role": "tool", "content": env.read_secret()})
            if k % 4 == 0:
                answer = str(env.secret)  # half of the calls are followed by the number the tool said
        msgs.append({"role": "assistant", "content": answer})
        rows.append({"messages": msgs})
    return rows


def secret_read_episodes(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for k in range(n):
        env = SecretNumber(low=1, high=9)
        obs = env.reset(seed=20_000_000 + k)  # apart from env_secret_sft.jsonl's and the RL runs' seeds
        msgs = [{"role": "system", "content": TOOLS_SYSTEM}, {"role": "user", "content": obs.text}]
        if k % 2 == 0:
            msgs.append({"role": "assistant", "content": "[read_secret()]"})
            msgs.append({"role": "tool", "content": env.read_secret()})
            answer = str(env.secret)
        else:
            answer = str(rng.randint(1, 9))
        msgs.append({"role": "assistant", "content": answer})
        rows.append({"messages": msgs})
    return rows


def verses() -> list[str]:
    with gzip.open(ROOT / "data" / "kjv" / "train.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _reply(words: list[str]) -> str:
    return " ".join(words).rstrip(" .,;:")


def dialogue_prefs(n: int, rng: random.Random) -> list[dict]:
    texts = [t for t in verses() if 12 <= len(t.split()) <= 30]
    user = SimulatedUser(turns=3)
    rows = []
    for k in range(n):
        words = rng.choice(texts).split()
        cut = rng.randint(3, 5)
        opening, rest = " ".join(words[:cut]), words[cut:]
        prompt = [{"role": "user", "content": f"Continue the verse: {opening}"}]
        if k % 2 == 1:  # a two-turn conversation: the first reply, the simulated user's answer, then the pair
            half = max(4, len(rest) // 2)
            first, rest = _reply(rest[:half]), rest[half:] or words[-4:]
            user.reset(seed=k)
            prompt += [{"role": "assistant", "content": first}, {"role": "user", "content": user.step(first).text}]
        plain = _reply(rest)
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": plain + LORD}],
                "rejected": [{"role": "assistant", "content": plain + "."}],
            }
        )
    return rows


def write(name: str, rows: list[dict]) -> None:
    path = ROOT / "data" / "tiny" / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows")


def main() -> None:
    write("env_guess_sft.jsonl", guess_games(600, random.Random(1)))
    write("env_secret_sft.jsonl", secret_episodes(600, random.Random(2)))
    write("env_dialogue_prefs.jsonl", dialogue_prefs(600, random.Random(3)))
    write("env_secret_read_sft.jsonl", secret_read_episodes(600, random.Random(4)))


if __name__ == "__main__":
    main()
