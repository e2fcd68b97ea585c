"""Environments bundled with prefcli, tiny enough that the 4M-parameter kjv-base learns them on a CPU in minutes
(recipes/tiny/rlhf-env-*.yaml; measured in docs/environments.md):

  guess:GuessNumber      a multi-turn game with feedback: guess a number, told "Higher." or "Lower."
  secret:SecretNumber    a tool-use task that cannot be solved without calling its tool
  dialogue:SimulatedUser a conversation with a rule-based simulated user, judged at the end by a reward model
"""
