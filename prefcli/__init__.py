"""prefcli: train language models on human preferences from the command line."""

__version__ = "0.2.0"
