"""Print the README's configuration table from EmbeddingConfig itself (tests check the README matches)."""

from __future__ import annotations

from embedding_service.config import EmbeddingConfig

BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def _default(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "(empty)"
    return "None" if value is None else str(value)


def config_table() -> str:
    rows = ["| field | env var | flag | default | meaning |", "|---|---|---|---|---|"]
    for name, field in EmbeddingConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flag += " / --no-" + name.replace("_", "-")
        rows.append(f"| `{name}` | `EMBEDDING_{name.upper()}` | `{flag}` | `{_default(default)}` | "
                    f"{(field.description or '').replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_table())
