"""prefcli: train language models on human preferences from the command line."""

__version__ = "0.2.0"

# Seeds are 0 .. 2^32 - 1, the range every generator prefcli seeds accepts (torch's, Python's, numpy's, datasets'),
# with room for the offsets derived from them (seed * 1_000_003 + step) inside torch's 64-bit seeds. Recipe fields
# and command-line options named seed use it (here: the CLI reads it without importing the recipe schemas).
SEED_MAX = 2**32 - 1
