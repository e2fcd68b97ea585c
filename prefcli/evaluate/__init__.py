"""Evaluation: metrics (`metrics`), model scoring (`scoring`), sampling with output control
(`generation`), the `prefcli eval` command (`eval`) and the human-labelling interface (`label`)."""
