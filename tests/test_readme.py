"""The README stays true: its commands exist, and the configuration table it points at (docs/configuration.md) is
EmbeddingConfig's."""

from __future__ import annotations

import sys

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from config_table import BEGIN, END, config_table

README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def test_configuration_table_matches_the_config_class() -> None:
    assert "(docs/configuration.md)" in README
    table = CONFIGURATION.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == config_table(), "run: python scripts/update_readme.py"


def test_the_two_commands_are_there_and_point_at_real_files() -> None:
    assert "make test" in README
    assert "scripts/install.sh && .venv/bin/embedding-service serve --demo" in README
    assert (ROOT / "scripts" / "install.sh").is_file() and (ROOT / "requirements" / "cpu.txt").is_file()
    assert "test:" in (ROOT / "Makefile").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
