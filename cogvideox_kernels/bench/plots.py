"""PNG plots of a bench run (matplotlib: the ``bench`` extra). On a GPU: TFLOP/s against sequence
length where an op ran at several lengths of one head layout (a line joins only points with the same
B, H and D), ms per shape otherwise. On a CPU: CPU ms per shape, titled as what they are."""
from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _tokens(shape: str) -> int | None:
    m = re.search(r"\bS(\d+)\b", shape)
    return int(m.group(1)) if m else None


def _layout(shape: str) -> str:
    """The shape without its sequence length ("B2 H48 S17776 D64" -> "B2 H48 D64"): points of one
    layout may be joined by a line, points of different layouts never."""
    return " ".join(part for part in shape.split() if not re.fullmatch(r"S\d+", part))


def plot_results(results, out_dir: str, tag: str, *, cpu: bool = False) -> list[str]:
    paths = []
    for op in sorted({r.op for r in results}):
        rows = [r for r in results if r.op == op and r.ms]
        if not rows:
            continue
        shapes = list(dict.fromkeys(r.shape for r in rows))
        variants = list(dict.fromkeys(r.variant for r in rows))
        lengths = {s: _tokens(s) for s in shapes}
        by_length = (not cpu and len(shapes) > 1 and all(lengths.values()) and all(r.tflops for r in rows)
                     and any(len([s for s in shapes if _layout(s) == _layout(t)]) > 1 for t in shapes))
        fig, ax = plt.subplots(figsize=(6.5, 4) if by_length else (max(6, 2.2 * len(shapes)), 4))
        if by_length:  # TFLOP/s vs tokens per sample: one line per (variant, head layout)
            layouts = list(dict.fromkeys(_layout(s) for s in shapes))
            for v in variants:
                for layout in layouts:
                    pts = sorted((lengths[r.shape], r.tflops) for r in rows
                                 if r.variant == v and _layout(r.shape) == layout)
                    if pts:
                        label = v if len(layouts) == 1 else f"{v}, {layout}"
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xlabel("tokens per sample (S)")
            ax.set_ylabel("TFLOP/s (higher is better)")
            ax.set_ylim(bottom=0)
        else:
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
            ax.set_ylabel("CPU ms (not the product's speed)" if cpu else "ms (lower is better)")
        ax.set_title(f"{op} ({tag}{', CPU timings' if cpu else ''})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_{tag}_{op.replace(' ', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
