"""Where one forward pass's time goes on a GPU: kernel time against wall time, and a bare launch's cost.

    python -m bench.studies.gpu_forward --kit DIR [--dtype bfloat16]

(on the device machine, with the model folder's config; random weights are drawn on the GPU.) Prints, per batch
size, the wall time of one eager forward and the summed GPU kernel time the profiler saw in it; when wall time
is far above kernel time the model is bound by the CPU launching kernels, not by the GPU, and only fewer
launches (CUDA graphs, compilation, bigger batches) make it faster.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoModel


def _wall_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kit", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per text")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    tiny = torch.ones(16, device="cuda")

    def one_kernel_and_wait() -> None:
        tiny.add_(1)
        torch.cuda.synchronize()

    round_trip = _wall_ms(one_kernel_and_wait, 1000)
    print(f"one tiny kernel, launched and waited for: {round_trip:.4f} ms")
    launches = _wall_ms(lambda: [tiny.add_(1) for _ in range(1000)], 3)
    print(f"1,000 tiny kernels launched, then one wait: {launches:.2f} ms")
    config = AutoConfig.from_pretrained(args.kit)
    with torch.device("cuda"):
        model = AutoModel.from_config(config, dtype=dtype).eval()
    for batch in (1, 32, 256):
        ids = torch.randint(0, 60_000, (batch, args.tokens), device="cuda")
        mask = torch.ones_like(ids)

        def forward(ids=ids, mask=mask) -> None:
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)

        wall = _wall_ms(forward)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                forward()
                torch.cuda.synchronize()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu = f"GPU kernels {sum(e.device_time for e in kernels) / 1000:.2f} ms ({len(kernels)} kernels)"
        except Exception as exc:  # the profiler is a diagnostic: its failure must not hide the wall times
            gpu = f"profiler failed: {exc!r}"
        print(f"batch {batch} x {args.tokens} tokens: wall {wall:.2f} ms, {gpu}", flush=True)
    # The remedy to try: one CUDA graph per shape replays all of a forward's kernels with one launch.
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    ids = torch.randint(0, 60_000, (32, args.tokens), device="cuda")
    mask = torch.ones_like(ids)

    def compiled_forward() -> None:
        with torch.inference_mode():
            compiled(input_ids=ids, attention_mask=mask)

    started = time.perf_counter()
    compiled_forward()
    compiled_forward()
    torch.cuda.synchronize()
    print(f"torch.compile(reduce-overhead), batch 32: first two calls {time.perf_counter() - started:.1f} s, "
          f"then {_wall_ms(compiled_forward):.2f} ms per forward", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
