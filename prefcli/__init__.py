"""prefcli: train language models on human preferences from the command line."""

__version__ = "0.1.0"
