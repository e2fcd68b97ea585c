"""The simulated raters' own tastes (scripts/make_multirater_data.py), without their noise: the gold reward of the
multi-rater task for `rewards: [{kind: function, function: tastes.py:taste}]`. A function with a `users`
parameter gets whom each completion is for (the prompts' user column).

    positive-*: the VADER compound of the completion      (higher = more positive)
    negative-*: minus it                                  (the opposite taste)
    brief-*:    minus its number of words, over 10        (shorter is better; /10 puts it near the others' scale)

A completion for no user (or an unknown taste) scores 0."""

from prefcli.reward_sources import vader_compound


def taste(prompts, completions, users=None):
    users = users or [None] * len(completions)
    sentiment = vader_compound(completions)
    out = []
    for text, v, user in zip(completions, sentiment, users):
        kind = (user or "").rsplit("-", 1)[0]
        if kind == "positive":
            out.append(v)
        elif kind == "negative":
            out.append(-v)
        elif kind == "brief":
            out.append(-len(text.split()) / 10)
        else:
            out.append(0.0)
    return out
