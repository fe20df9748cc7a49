"""One-off studies: each answers one question with its own command (see docs/bench.md); the harness
(`python -m bench`) is the package above."""
