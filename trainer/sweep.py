"""Calibration sweeps: the seen-unseen mIoU curve, its AUSUC, table, figure and files."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from model.metric import ausuc


def _row(record: dict, sigma: float | None = None) -> dict:
    row = {"mIoU_seen": record["mIoU_seen"] or 0.0, "mIoU_unseen": record["mIoU_unseen"] or 0.0,
           "mIoU_harmonic": record["mIoU_harmonic"] or 0.0}
    return row if sigma is None else {"sigma": sigma, **row}


def summarize(records: Sequence[dict], ends: dict[str, dict], stacking: Sequence[dict] = (),
              calibration: str = "top2") -> dict:
    """Sweep summary from per-sigma metric records (percent), the two end records and the
    calibrated-stacking records of the AUSUC grid (the AUSUC curve)."""
    rows = [_row(r, r["sigma"]) for r in sorted(records, key=lambda r: r["sigma"])]
    best = max(rows, key=lambda r: r["mIoU_harmonic"])
    end_rows = {name: _row(rec) for name, rec in ends.items()}
    curve = [_row(r, r["sigma"]) for r in stacking]
    points = [(r["mIoU_unseen"] / 100, r["mIoU_seen"] / 100) for r in [*curve, *end_rows.values()]]
    return {"calibration": calibration, "rows": rows, "best": best, "ends": end_rows,
            "ausuc": round(ausuc(points), 6), "ausuc_curve": curve}


def format_sweep_table(summary: dict) -> str:
    """sigma | seen | unseen | harmonic, the best row marked, then AUSUC."""
    lines = [f"{'sigma':>8s} {'seen':>7s} {'unseen':>7s} {'harm.':>7s}"]
    for row in summary["rows"]:
        mark = "  <- best" if row is summary["best"] else ""
        lines.append(f"{row['sigma']:8.4g} " + " ".join(
            f"{row[k]:7.2f}" for k in ("mIoU_seen", "mIoU_unseen", "mIoU_harmonic")) + mark)
    for name, end in summary["ends"].items():
        lines.append(f"{name:>8s} {end['mIoU_seen']:7.2f} {end['mIoU_unseen']:7.2f}")
    lines.append(f"AUSUC (calibrated stacking 1e-3..1e3, ends included): {summary['ausuc']:.4f}")
    return "\n".join(lines)


def sweep_figure(summary: dict, title: str = ""):
    """Matplotlib figure of the seen-vs-unseen mIoU curve with the best sigma marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["rows"]
    xs = [r["mIoU_unseen"] for r in rows]
    ys = [r["mIoU_seen"] for r in rows]
    figure, axis = plt.subplots(figsize=(5.2, 4.2), dpi=110)
    ends = summary["ends"]
    stacking = sorted(summary.get("ausuc_curve", []), key=lambda r: -r["sigma"])  # seen end -> unseen end
    curve = [*([ends["seen_only"]] if "seen_only" in ends else []), *stacking,
             *([ends["unseen_only"]] if "unseen_only" in ends else [])]
    if curve:
        axis.plot([r["mIoU_unseen"] for r in curve], [r["mIoU_seen"] for r in curve], ".-", color="0.65", lw=1,
                  ms=3, zorder=1, label="calibrated stacking, 1e-3..1e3 (AUSUC)")
    rule = {"top2": "top-2", "all": "all-class"}.get(summary.get("calibration", "top2"), "top-2")
    axis.plot(xs, ys, "o-", c="tab:blue", ms=4, lw=1, zorder=2, label=f"sigma sweep ({rule} calibration)")
    best = summary["best"]
    axis.scatter([best["mIoU_unseen"]], [best["mIoU_seen"]], marker="*", s=180, c="tab:red", zorder=3,
                 label=f"best harmonic: sigma {best['sigma']:.3g} ({best['mIoU_harmonic']:.1f})")
    axis.set_xlabel("unseen mIoU (%)")
    axis.set_ylabel("seen mIoU (%)")
    axis.set_xlim(0, 100)
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right", fontsize=8)
    axis.set_title(f"{title}AUSUC {summary['ausuc']:.4f}", fontsize=10)
    figure.tight_layout()
    return figure


def write_sweep(run_dir: Path, summary: dict, stem: str) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png`` into the run directory."""
    run_dir = Path(run_dir)
    paths = [run_dir / f"{stem}.json", run_dir / f"{stem}.csv", run_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(summary, indent=2) + "\n")
    with paths[1].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sigma", "mIoU_seen", "mIoU_unseen", "mIoU_harmonic"])
        writer.writeheader()
        writer.writerows(summary["rows"])
    figure = sweep_figure(summary, title=f"{stem}: ")
    figure.savefig(paths[2])
    import matplotlib.pyplot as plt
    plt.close(figure)
    return paths
