"""Random-weight model builders for the tests and the benchmark (needs torch and transformers). Not part of the
wheel: the server never imports it."""
