"""Plot bench/results/kernels-<device>.json (matplotlib is not on the GPU machine: run here).

    python bench/kernels/plot.py bench/results/kernels-h100.json   # -> kernels-h100.png beside it
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

path = sys.argv[1]
res = json.load(open(path))
rows = [r for r in res["timing"] if r.get("ms")]
ks = [k for k in ("sglang_triton", "fi_decode", "fi_cascade", "relay_triton", "relay_fi", "relay_hybrid", "relay_hybrid_stream")
      if any(r["ms"].get(k) for r in rows)]
fig, ax = plt.subplots(figsize=(18, 6))
w = 0.8 / len(ks)
for i, k in enumerate(ks):
    xs = [j + (i - (len(ks) - 1) / 2) * w for j in range(len(rows))]
    ax.bar(xs, [r["ms"].get(k) or 0 for r in rows], w, label=k)
ax.plot(range(len(rows)), [r["floor_ms"] for r in rows], "k_", markersize=14, label="HBM floor (relay bytes)")
ax.set_yscale("log")
ax.set_xticks(range(len(rows)))
ax.set_xticklabels([r["config"] for r in rows], rotation=75, fontsize=7)
ax.set_ylabel("ms per layer (median, CUDA graph, L2 flushed)")
ax.set_title(f"Relay decode attention, bf16, {res['device']}")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(path.replace(".json", ".png"), dpi=110)
print("wrote", path.replace(".json", ".png"))
