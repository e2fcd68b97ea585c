"""Looking at preference data and inside trained models: `prefcli data inspect` and `prefcli explain`."""
