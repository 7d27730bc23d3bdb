"""The files an experiment writes (``minideeplab.experiments``): a CSV of every run, a Markdown summary with
mean ± std and the paired per-seed differences from the baseline variant, and three figures. Everything is written
atomically. ``committed_results``, ``read_results`` and ``summarize`` serve notebooks that show committed results.
"""
from __future__ import annotations

import csv
import io as _io
import math
from pathlib import Path

import numpy as np

from .io import atomic_write
from .plots import _figure, _save

HEADLINE = ("iou", "boundary_iou")
LABELS = {"iou": "IoU", "boundary_iou": "Boundary IoU", "seconds_per_image": "eval s/image",
          "train_s_per_step": "train s/step", "step_peak_mib": "step peak MiB"}
COLUMNS = ("experiment", "variant", "seed", "iou", "boundary_iou", "dice", "precision", "recall", "accuracy")


def trimap_keys(rows) -> list:
    """The ``trimap_iou_<w>px`` keys of the rows, by width."""
    keys = {k for r in rows for k in r if k.startswith("trimap_iou_")}
    return sorted(keys, key=lambda k: int(k[len("trimap_iou_"):-2]))


def read_results(path) -> list:
    """The rows of a ``results.csv`` with numbers as numbers."""
    def number(v):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v
    with open(path, newline="") as f:
        return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def committed_results(name: str, start=None) -> Path:
    """The folder of experiment ``name``'s committed results, ``docs/experiments/<name>`` of the source checkout:
    looked for from ``start`` (default: the working directory, e.g. ``notebooks/``) up, then beside the package.
    A FileNotFoundError says how to produce it when it is not there (an installed package has no docs)."""
    here = Path(start or Path.cwd()).resolve()
    for root in (here, *here.parents, Path(__file__).resolve().parents[1]):
        folder = root / "docs" / "experiments" / name
        if (folder / "results.csv").is_file():
            return folder
    raise FileNotFoundError(f"no committed results of experiment {name!r} (docs/experiments/{name}/results.csv) "
                            f"above {here}: run 'minideeplab experiment {name} --out docs/experiments/{name}' in a "
                            "source checkout")


def _values(rows, variant, key, seeds):
    by_seed = {r["seed"]: r[key] for r in rows if r["variant"] == variant}
    return np.array([by_seed[s] for s in seeds], dtype=float)


def _mean_std(a) -> tuple:
    return float(np.mean(a)), float(np.std(a, ddof=1)) if len(a) > 1 else float("nan")


def summarize(rows, variants, baseline: str, keys=HEADLINE) -> dict:
    """Per variant and key: ``mean``, ``std`` (over seeds, ddof 1), and against the baseline the per-seed
    differences ``diffs`` (variant − baseline, seed by seed), their ``diff_mean``, ``diff_std`` and ``wins`` (seeds
    where the variant is higher)."""
    seeds = sorted({r["seed"] for r in rows})
    out = {}
    for v in variants:
        out[v] = {}
        for k in keys:
            a, b = _values(rows, v, k, seeds), _values(rows, baseline, k, seeds)
            d = a - b
            (m, s), (dm, ds) = _mean_std(a), _mean_std(d)
            out[v][k] = {"mean": m, "std": s, "values": a.tolist(), "diffs": d.tolist(), "diff_mean": dm,
                         "diff_std": ds, "wins": int((d > 0).sum()), "seeds": len(seeds)}
    return out


def _pm(m, s, digits=3) -> str:
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(exp, variants, baseline, rows, settings, seeds, command, elapsed, machine, load=None) -> str:
    names = [v.name for v in variants]
    tri = trimap_keys(rows)
    costs = [k for k in ("train_s_per_step", "seconds_per_image", "step_peak_mib") if k in rows[0]]
    keys = list(HEADLINE) + tri + costs
    stats = summarize(rows, names, baseline, keys)
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "device")
    lines = [f"# {exp.title}", "", f"Claim tested: {exp.claim}.", "",
             f"- command: `{command}`", f"- machine: {machine}; device {settings.get('device', 'cpu')}; "
             f"{elapsed / 60:.1f} min in all", *([f"- load: {load}"] if load else []), f"- settings: {shown}; data {settings.get('data') or exp.data}",
             f"- seeds: {', '.join(map(str, seeds))}; validation images per seed: {settings.get('val_size')}", "",
             f"## Mean ± std over {len(seeds)} seeds", "",
             "| variant | " + " | ".join(LABELS.get(k, k.replace("trimap_iou_", "trimap ")) for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for v in names:
        digits = {k: 3 if k not in costs else (1 if k == "step_peak_mib" else 4) for k in keys}
        lines.append(f"| {v} | " + " | ".join(_pm(stats[v][k]["mean"], stats[v][k]["std"], digits[k])
                                                for k in keys) + " |")
    lines += ["", f"## Paired differences from the baseline ({baseline}), variant − baseline per seed", "",
              "| variant | " + " | ".join(f"Δ {LABELS[k]} (mean ± std) | per seed | higher in" for k in HEADLINE)
              + " |", "|---|" + "---|---|---|" * len(HEADLINE)]
    for v in names:
        if v == baseline:
            continue
        cells = []
        for k in HEADLINE:
            st = stats[v][k]
            cells += [_pm(st["diff_mean"], st["diff_std"], 3), " ".join(f"{d:+.3f}" for d in st["diffs"]),
                      f"{st['wins']}/{st['seeds']}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "IoU and Boundary IoU are micro-averaged over each seed's validation set (sums of intersections "
              "and unions, minideeplab.metrics); Boundary IoU with d = 2 % of the image diagonal; trimap IoU counts "
              "only the pixels within w px of a ground-truth boundary. Files: results.csv, metrics.png, trimap.png, "
              "predictions.png.", ""]
    return "\n".join(lines)


def _csv_text(rows) -> str:
    keys = list(COLUMNS) + trimap_keys(rows)
    keys += [k for k in rows[0] if k not in keys]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows({k: r.get(k, "") for k in keys} for r in rows)
    return buf.getvalue()


def plot_metrics(rows, names, path) -> Path:
    """Bars of the mean IoU and Boundary IoU per variant, std error bars, and each seed as a dot."""
    fig = _figure((max(5.0, 1.6 * len(names) + 2), 3.6))
    ax = fig.subplots()
    seeds = sorted({r["seed"] for r in rows})
    x, width = np.arange(len(names)), 0.38
    for j, key in enumerate(HEADLINE):
        vals = [_values(rows, n, key, seeds) for n in names]
        means = [v.mean() for v in vals]
        stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
        pos = x + (j - 0.5) * width
        ax.bar(pos, means, width, yerr=stds, capsize=3, label=LABELS[key], alpha=0.8)
        for p, v in zip(pos, vals):
            ax.plot(np.full(len(v), p), v, "k.", ms=4)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel=f"score (mean ± std, {len(seeds)} seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_trimap(rows, names, path) -> Path:
    """Trimap IoU against the band width, mean ± std per variant (DeepLab's boundary plot)."""
    keys = trimap_keys(rows)
    widths = [int(k[len("trimap_iou_"):-2]) for k in keys]
    seeds = sorted({r["seed"] for r in rows})
    fig = _figure((5.5, 3.6))
    ax = fig.subplots()
    for n in names:
        vals = np.array([_values(rows, n, k, seeds) for k in keys])     # (widths, seeds)
        mean = vals.mean(axis=1)
        (line,) = ax.plot(widths, mean, "o-", label=n, ms=4)
        if len(seeds) > 1:
            std = vals.std(axis=1, ddof=1)
            ax.fill_between(widths, mean - std, mean + std, alpha=0.15, color=line.get_color())
    ax.set(xscale="log", xlabel="trimap band width (px)", ylabel="IoU within the band", ylim=(0, 1))
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_predictions(figure: dict, names, path, threshold: float = 0.5) -> Path:
    """The same validation images predicted by every variant (first seed): image, ground truth, one column each."""
    from .data.transforms import denormalize
    images, masks, _ = figure[names[0]]
    n, cols = len(images), 2 + len(names)
    fig = _figure((1.9 * cols, 1.9 * n + 0.4))
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    for i in range(n):
        panels = [(denormalize(images[i]), "image"), (masks[i, 0], "ground truth")]
        panels += [(figure[v][2][i, 0] > threshold, v) for v in names]
        for ax, (panel, title) in zip(axes[i], panels):
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_report(out, exp, variants, baseline, rows, figure, settings, seeds, command, elapsed, machine,
                 load=None) -> None:
    """results.csv, summary.md, metrics.png, trimap.png and predictions.png in ``out`` (created)."""
    out = Path(out)
    names = [v.name for v in variants]
    with atomic_write(out / "results.csv", "w", newline="") as f:
        f.write(_csv_text(rows))
    with atomic_write(out / "summary.md", "w") as f:
        f.write(markdown(exp, variants, baseline, rows, settings, seeds, command, elapsed, machine, load))
    plot_metrics(rows, names, out / "metrics.png")
    plot_trimap(rows, names, out / "trimap.png")
    plot_predictions(figure, names, out / "predictions.png")
