"""Benchmark harness for embedding-service and its peers (vllm serve, Infinity). See docs/bench.md."""
