"""Write tests/data/colbert_reference.json: PyLate's token vectors and MaxSim scores on the random ColBERT
fixture (testkit.random_models.build_random_colbert), for tests/test_multivector.py to compare against.

PyLate 1.6 pins sentence-transformers 5.3 and transformers <= 5.3, older than this project's, so it runs in a
venv of its own (created once under the cache folder; ~1.5 min) and never in the project's environment:

    python scripts/colbert_reference.py            # with the project's venv: builds the fixture, runs PyLate

The fixture's folder is built here, with the project's packages (exactly as the tests build it); PyLate reads
that folder. Its weights come from numpy's generator, and the file records a digest of its tensors, so a test
can tell a changed fixture from a changed server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "colbert_reference.json"
PYLATE = ["pylate==1.6.0", "sentence-transformers==5.3.0", "transformers==5.3.0", "scipy", "datasets",
          "ujson==5.12.0"]
CACHE = Path(os.environ.get("EMBEDDING_TEST_CACHE", tempfile.gettempdir())) / "embedding-service-test-cache"

QUERIES = ["what is late interaction?", "capital of France", "Who wrote the tokenizer, and why?",
           "a longer query that goes on and on past the query length of sixteen tokens, which PyLate truncates"]
DOCUMENTS = ["Late interaction keeps one vector per token; MaxSim sums each query token's best match.",
             "Paris is the capital of France.", "Hello, world! (punctuation: ; . , ? -- all of it)",
             "short",
             "A long document " + "that repeats itself, sentence after sentence, " * 6 + "until it is cut."]


def pylate_side(folder: str, out: str) -> None:
    """(In PyLate's venv.) Encode the texts and score every pair with PyLate; write the JSON."""
    import torch
    from pylate import models, scores

    model = models.ColBERT(model_name_or_path=folder, device="cpu")
    vocabulary = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    assert len(model.tokenizer) == vocabulary, "PyLate added tokens: the fixture lacks its [Q]/[D] markers"
    queries = model.encode(QUERIES, is_query=True, batch_size=2)
    documents = model.encode(DOCUMENTS, is_query=False, batch_size=2)
    maxsim = [[float(scores.colbert_scores(torch.as_tensor(q)[None], torch.as_tensor(d)[None])[0, 0])
               for d in documents] for q in queries]
    Path(out).write_text(json.dumps({
        "pylate": __import__("pylate").__version__, "queries": QUERIES, "documents": DOCUMENTS,
        "query_vectors": [q.tolist() for q in queries], "document_vectors": [d.tolist() for d in documents],
        "scores": maxsim}))


def pylate_python() -> Path:
    venv = CACHE / "pylate-venv"
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0+cpu"], check=True)  # the CPU build (no CUDA download)
        # PyLate's index back-ends (fast-plaid, fastkmeans) pin other torch builds and are not needed to encode.
        subprocess.run([*pip, "--no-deps", PYLATE[0]], check=True)
        subprocess.run([*pip, *PYLATE[1:]], check=True)
        (venv / ".installed").touch()
    return python


def main() -> None:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from embedding_service.backends.model.resolve import demo_model_dir
    from testkit.random_models import build_random_colbert, tensor_digest

    with tempfile.TemporaryDirectory() as scratch:
        folder = build_random_colbert(Path(scratch) / "colbert", demo_model_dir())
        raw = Path(scratch) / "reference.json"
        subprocess.run([str(pylate_python()), __file__, "--pylate", str(folder), str(raw)], check=True)
        data = json.loads(raw.read_text())
        data["tensor_digest"] = tensor_digest(folder)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT} (PyLate {data['pylate']})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pylate"]:
        pylate_side(sys.argv[2], sys.argv[3])
    else:
        main()
