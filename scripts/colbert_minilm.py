"""Build an untrained ColBERT reranker from the real all-MiniLM-L6-v2 weights, with PyLate (in its own venv,
as scripts/colbert_reference.py makes it), for the hybrid example's rerank stage (docs/hybrid.md):

    python scripts/colbert_minilm.py /tmp/colbert-minilm                 # identity projection, 384 dimensions
    python scripts/colbert_minilm.py /tmp/colbert-minilm-128 --size 128  # PyLate's random 384 -> 128 projection

PyLate's `models.ColBERT` on a base encoder adds the [Q] / [D] markers to the tokenizer (their two new
embedding rows are initialised by transformers' resize) and a projection without bias. No ColBERT training
happens: with `--size 384` the projection is set to the identity, so a token's vector is MiniLM's own
contextual token vector, normalised, and MaxSim scores with MiniLM's token space; with a smaller size, a random
projection keeps inner products roughly (Johnson-Lindenstrauss). Either way this is a late-interaction reranker
nobody trained for it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HF_FILES = ("config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.txt")


def pylate_side(base: str, out: str, size: int) -> None:
    """(In PyLate's venv.) A ColBERT model on the base encoder, saved as PyLate saves it."""
    from pylate import models

    models.ColBERT(model_name_or_path=base, embedding_size=size, device="cpu").save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=384, help="projection size (384: the identity)")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]
    from colbert_reference import pylate_python  # type: ignore[import-not-found]

    from embedding_service.backends.model.resolve import demo_model_dir

    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "minilm"  # the bare encoder: PyLate would try to convert MiniLM's pooling module
        base.mkdir()
        for name in HF_FILES:
            shutil.copy(Path(demo_model_dir()) / name, base / name)
        subprocess.run([str(pylate_python()), __file__, "--pylate", str(base), str(args.out), str(args.size)],
                       check=True)
    if args.size == 384:
        import numpy as np
        from safetensors.numpy import load_file, save_file

        path = args.out / "1_Dense" / "model.safetensors"
        weights = load_file(str(path))
        assert weights["linear.weight"].shape == (384, 384), weights["linear.weight"].shape
        save_file({"linear.weight": np.eye(384, dtype=np.float32)}, str(path), metadata={"format": "pt"})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pylate"]:
        pylate_side(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
