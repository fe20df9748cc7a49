"""A bar chart of a run: texts/s per workload, one bar per target, each bar labelled with its ratio to a baseline.

    python -m bench.chart RESULTS.json [OUT.png]      (bench/run.py writes chart.png beside results.md)

The baseline is `vllm-serve` where the run has it (the peer the issue's goals are stated against), else the
first target. One panel per model. Needs matplotlib (the test extra has it); without it, no chart, a message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.report import median_rates

__all__ = ["write_chart"]


def write_chart(result: dict[str, Any], out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", flush=True)
        return None
    rows = [r for r in result.get("rows", []) if r.get("texts_per_s")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return None
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3.6 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        workloads = list(dict.fromkeys(r["workload"] for r in mine))
        targets = list(dict.fromkeys(r["target"] for r in mine))
        base = "vllm-serve" if "vllm-serve" in targets else targets[0]
        rate = {(w, t): v for (t, w), v in median_rates(mine).items()}  # medians over --repeat rounds
        width = 0.8 / len(targets)
        for i, target in enumerate(targets):
            xs = [w + (i - (len(targets) - 1) / 2) * width for w in range(len(workloads))]
            ys = [rate.get((w, target), 0.0) for w in workloads]
            bars = ax.bar(xs, ys, width, label=target)
            for bar, w in zip(bars, workloads, strict=True):
                ref = rate.get((w, base))
                if ref and rate.get((w, target)):
                    ax.annotate(f"{rate[(w, target)] / ref:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel("texts/s")
        ax.set_title(f"{model}: texts/s per workload (labels: ratio to {base})", fontsize=10)
        ax.legend(fontsize=7, ncols=min(len(targets), 4))
    fig.suptitle(f"{result.get('started', '')}  dtype {result.get('dtype', '')}, "
                 f"{result.get('threads', '')} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    source = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else source.with_name("chart.png")
    written = write_chart(json.loads(source.read_text()), out)
    print(f"wrote {written}" if written else "no chart written")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
