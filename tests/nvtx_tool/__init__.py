"""A real NVTX injection tool for tests: see ``harness.py`` and ``README.md``."""
