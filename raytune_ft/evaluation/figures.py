"""The reliability diagram as PNG bytes (matplotlib's object API on the Agg canvas, as the report draws)."""

from __future__ import annotations

import io
from typing import Any


def reliability_png(calibration: dict[str, Any]) -> bytes:
    """Accuracy against confidence per bin, beside the diagonal a calibrated model follows; bar width = the bin,
    and each bin's row count printed on it so that empty and thin bins are not over-read."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    for b in calibration["bins"]:
        if not b["rows"]:
            continue
        width = b["high"] - b["low"]
        ax.bar(b["low"], b["accuracy"], width=width, align="edge", color="#4c72b0", edgecolor="white", alpha=0.85)
        ax.plot(b["confidence"], b["accuracy"], "o", color="#dd8452", markersize=4)
        ax.text(b["low"] + width / 2, min(b["accuracy"] + 0.02, 0.97), str(b["rows"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability: ECE {calibration['ece']:.3f}, {calibration['rows']} rows")
    ax.legend(loc="upper left", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
