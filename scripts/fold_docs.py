"""Fold a docs/*.md section into README.md before a given heading (one-off helper for merging branches)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fold(doc: Path, before: str, shift: int) -> None:
    text = doc.read_text(encoding="utf-8").strip() + "\n\n"
    if shift:
        text = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + shift) + " ", text, flags=re.M)
        # headings inside fenced code blocks are comments, not headings: undo the shift there
        parts = text.split("```")
        for i in range(1, len(parts), 2):
            parts[i] = re.sub(r"^#(#+) ", r"\1 ", parts[i], flags=re.M) if shift else parts[i]
        text = "```".join(parts)
    readme = ROOT / "README.md"
    body = readme.read_text(encoding="utf-8")
    assert before in body, before
    readme.write_text(body.replace(before, text + before, 1), encoding="utf-8")


if __name__ == "__main__":
    fold(ROOT / sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
