"""The medical recipe end to end (``python -m bench.medical``): train, evaluate, transfer."""
