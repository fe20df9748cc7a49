"""Peak memory of one ~1 MB input under long_inputs chunk (issue 38): all-MiniLM-L6-v2 on the torch engine, fp32,
max_model_len 256, max_batch_tokens 8192. The process first embeds two full batches (64 inputs of 256 tokens:
the most one request's windows may hold in flight), then the 0.93 MB text; the peak RSS after each is printed.

    PYTHONPATH=src python -m bench.studies.long_input_memory
"""

from __future__ import annotations

import asyncio
import resource
import time

from embedding_service.backends.model.resolve import demo_model_dir
from embedding_service.config import EmbeddingConfig
from embedding_service.engine.types import EmbedRequest
from embedding_service.service import build_engine, plan_model


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main() -> None:
    config = EmbeddingConfig(_env_file=None, engine="torch", model_path=demo_model_dir(), dtype="float32",  # type: ignore[call-arg]
                             max_model_len=256, max_batch_tokens=8192, long_inputs="chunk", demo=True,
                             request_timeout_s=1800)
    engine = build_engine(plan_model(config))
    await engine.start()
    sentence = "the quiet ferry crossed the river at dawn while maps of old towns lay on the table"  # 17 words
    text = " ".join([sentence] * 11_176)  # 190,000 words
    await engine.embed(EmbedRequest(token_ids=[[2000 + i for i in range(254)]] * 64))  # 2 batches of 32 x 256
    warm = _peak_mb()
    started = time.perf_counter()
    result = await engine.embed(EmbedRequest(texts=[text]))
    took = time.perf_counter() - started
    print(f"text {len(text) / 1e6:.2f} MB, {result.prompt_tokens} tokens in {result.chunked[0]} windows, {took:.1f}s; "
          f"peak RSS after two full batches {warm:.0f} MB, after the 1 MB input {_peak_mb():.0f} MB")
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
