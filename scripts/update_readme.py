"""Rewrite the configuration table in docs/configuration.md from EmbeddingConfig (run after adding a field)."""

from __future__ import annotations

from pathlib import Path

from config_table import BEGIN, END, config_table

README = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def main() -> None:
    text = README.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{config_table()}\n{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
