"""The FLA / kda_ext ratio chart (PNG) of benchmark rows, shared by bench_chunk_kda.py (--png) and
targets.py (--png). Only matplotlib, imported when a chart is asked for; no torch, so targets.py
keeps running on machines without it.
"""
import sys


def write_chart(rows, path, title):
    """Bar chart of FLA time / our time per (shape, mode) for fwd, bwd and fwd+bwd; 1.0 marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--png needs matplotlib (pip install matplotlib): no chart written", file=sys.stderr)
        return False
    metrics = [m for m in ("fwd", "bwd", "fwdbwd")
               if any(m in r.get("ours", {}) and m in r.get("fla", {}) for r in rows)]
    labels = [f"{r['shape']}\n{r['mode']}" for r in rows]
    if not metrics:
        print("--png: no configuration has both our and FLA's times: no chart written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.0))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        ratios = []
        for r in rows:
            a, b = r.get("ours", {}).get(m), r.get("fla", {}).get(m)
            ratios.append(b / a if a and b else 0.0)
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, ratios, width, label={"fwdbwd": "fwd+bwd"}.get(m, m))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("FLA time / kda_ext time (> 1: kda_ext faster)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
