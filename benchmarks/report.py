"""Write benchmark results a person can open: results.md, results.csv, results.json, latency.png and, when accuracy
was measured, accuracy_vs_latency.png."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from transferkit.benchmarks.sweep import Row


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


FP32_REFERENCE = "onnx"  # what int8, fp16 and bf16 rows are compared with: the same model's fp32 ONNX


def versus_fp32(rows: list[Row], batch_sizes: list[int]) -> dict[int, dict]:
    """Per row (by ``id``): images/s ÷ the same model's fp32 ONNX row per batch size, and the top-1 change in points
    (what a lower precision buys and costs, side by side); empty where that row was not measured."""
    reference = {r.model: r for r in rows if r.backend == FP32_REFERENCE and not r.error}
    compared: dict[int, dict] = {}
    for r in rows:
        base = reference.get(r.model)
        if base is None or r is base:
            compared[id(r)] = {"speed": {}, "top1_points": None}
            continue
        speed = {b: r.images_per_s[b] / base.images_per_s[b] for b in batch_sizes
                 if r.images_per_s.get(b) and base.images_per_s.get(b)}
        points = 100 * (r.accuracy - base.accuracy) if r.accuracy is not None and base.accuracy is not None else None
        compared[id(r)] = {"speed": speed, "top1_points": points}
    return compared


def markdown(rows: list[Row], batch_sizes: list[int]) -> str:
    header = ["model", "backend", "provider", "input", "size MB", "params", "depth"]
    for b in batch_sizes:
        header += [f"ms/step b{b} (p90, min-max)", f"img/s b{b}", f"× keras b{b}", f"× fp32 b{b}"]
    header += ["top-1", "Δ top-1 vs fp32 (points)", "top-5", "keras predict() b1 ms", "error"]
    compared = versus_fp32(rows, batch_sizes)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.model, r.backend, r.provider or "-", f"{r.input_size}²", _fmt(r.size_mb), _fmt(r.parameters),
                 _fmt(r.depth)]
        for b in batch_sizes:
            t = r.latency.get(b)
            cells.append(f"{t['median_ms']:.2f} ({t['p90_ms']:.2f}, {t['min_ms']:.2f}–{t['max_ms']:.2f})"
                         if t else "-")
            cells += [_fmt(r.images_per_s.get(b), 1), _fmt(r.speedup_vs_keras.get(b)),
                      _fmt(compared[id(r)]["speed"].get(b))]
        points = compared[id(r)]["top1_points"]
        cells += [_fmt(r.accuracy, 4), "-" if points is None else f"{points:+.2f}", _fmt(r.top5_accuracy, 4),
                  _fmt(r.predict_b1_ms, 1), r.error or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[Row], batch_sizes: list[int], env: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv", "json": out / "results.json",
             "latency_plot": out / "latency.png"}
    table = markdown(rows, batch_sizes)
    settings = env.get("settings", {})
    paths["markdown"].write_text(
        f"# transferkit bench\n\n{env['cpu']} ({env['cores_available']} cores available), GPU: {env['gpu'] or 'none'}, "
        f"threads {settings.get('threads') or 'all available'}, warm-up {settings.get('warmup')}, "
        f"{settings.get('repeats')} timed steps per cell; median ms per step.\n\n{table}\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["model", "backend", "provider", "input_size", "size_mb", "parameters", "published_parameters",
                  "depth"]
        for b in batch_sizes:
            header += [f"b{b}_median_ms", f"b{b}_p90_ms", f"b{b}_min_ms", f"b{b}_max_ms", f"b{b}_images_per_s",
                       f"b{b}_speedup_vs_keras", f"b{b}_speedup_vs_fp32"]
        header += ["top1", "top1_change_vs_fp32_points", "top5", "keras_predict_b1_ms", "error"]
        writer.writerow(header)
        compared = versus_fp32(rows, batch_sizes)
        for r in rows:
            line = [r.model, r.backend, r.provider, r.input_size, r.size_mb, r.parameters, r.published_params,
                    r.depth]
            for b in batch_sizes:
                t = r.latency.get(b, {})
                line += [t.get("median_ms"), t.get("p90_ms"), t.get("min_ms"), t.get("max_ms"),
                         r.images_per_s.get(b), r.speedup_vs_keras.get(b), compared[id(r)]["speed"].get(b)]
            line += [r.accuracy, compared[id(r)]["top1_points"], r.top5_accuracy, r.predict_b1_ms, r.error]
            writer.writerow(line)
    paths["json"].write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    _latency_plot(rows, batch_sizes, paths["latency_plot"])
    if any(r.accuracy is not None for r in rows):
        paths["accuracy_plot"] = out / "accuracy_vs_latency.png"
        _accuracy_plot(rows, batch_sizes[0], paths["accuracy_plot"])
    return paths


def _latency_plot(rows: list[Row], batch_sizes: list[int], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, no figure registry to close

    models = list(dict.fromkeys(r.model for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    fig = Figure(figsize=(max(6, 1.6 * len(models)) * len(batch_sizes), 4.5))
    axes = fig.subplots(1, len(batch_sizes), squeeze=False)
    width = 0.8 / max(1, len(backends))
    for ax, batch in zip(axes[0], batch_sizes):
        for i, backend in enumerate(backends):
            values = []
            for model in models:
                row = next((r for r in rows if r.model == model and r.backend == backend), None)
                values.append(row.latency[batch]["median_ms"] / batch if row and batch in row.latency else 0)
            ax.bar([m + i * width for m in range(len(models))], values, width, label=backend)
        ax.set_xticks([m + width * (len(backends) - 1) / 2 for m in range(len(models))], models, rotation=20,
                      ha="right")
        ax.set_ylabel("ms per image (median)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _accuracy_plot(rows: list[Row], batch: int, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for r in rows:
        if r.accuracy is None or batch not in r.latency:
            continue
        x = r.latency[batch]["median_ms"] / batch
        ax.scatter(x, r.accuracy)
        ax.annotate(f"{r.model} {r.backend}", (x, r.accuracy), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"ms per image at batch {batch} (median)")
    ax.set_ylabel("top-1 accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
