"""PNG plots of a bench run (matplotlib is optional)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_results(results, out_dir: str, tag: str) -> list[str]:
    paths = []
    for op in sorted({r.op for r in results}):
        rows = [r for r in results if r.op == op and r.ms]
        if not rows:
            continue
        shapes = list(dict.fromkeys(r.shape for r in rows))
        variants = list(dict.fromkeys(r.variant for r in rows))
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(shapes)), 4))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            xs, ys = [], []
            for j, s in enumerate(shapes):
                r = next((r for r in rows if r.shape == s and r.variant == v), None)
                if r:
                    xs.append(j + i * width)
                    ys.append(r.ms)
            ax.bar(xs, ys, width, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=7)
        ax.set_ylabel("ms (lower is better)")
        ax.set_title(f"{op} ({tag})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_{tag}_{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
