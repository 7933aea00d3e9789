"""Per-mode summaries of evaluation results: a markdown table, a JSON file and a PNG chart.

The chart needs matplotlib (``pip install 'blockrag[eval]'``); it is imported only when a chart is drawn, with
the non-interactive Agg backend.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
CHART_FILE = "chart.png"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (NumPy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize_mode(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the result records of one mode. Records with an ``error`` are counted, not scored."""
    scored = [r for r in records if not r.get("error")]
    ttft_ms = [1000.0 * r["ttft_s"] for r in scored]
    recall = [bool(r["answer_in_passages"]) for r in scored if r.get("answer_in_passages") is not None]
    return {
        "n": len(scored),
        "errors": len(records) - len(scored),
        "accuracy": 100.0 * _mean([r["accuracy"] for r in scored]),
        "em": 100.0 * _mean([r["em"] for r in scored]),
        "f1": 100.0 * _mean([r["f1"] for r in scored]),
        "ttft_ms_mean": _mean(ttft_ms),
        "ttft_ms_p50": percentile(ttft_ms, 50),
        "ttft_ms_p95": percentile(ttft_ms, 95),
        "context_tokens_mean": _mean([r["context_tokens"] for r in scored]),
        "cached_tokens_mean": _mean([r["cached_tokens"] for r in scored]),
        "prefilled_tokens_mean": _mean([r["prefilled_tokens"] for r in scored]),
        "encoded_tokens_total": sum(r["encoded_tokens"] for r in scored),
        "generated_tokens_mean": _mean([r["generated_tokens"] for r in scored]),
        "recomputed_tokens_mean": _mean([r.get("recomputed_tokens", 0) for r in scored]),
        "answer_in_passages": 100.0 * _mean(recall) if recall else None,
    }


def summarize(records: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {mode: summarize_mode([r for r in records if r["mode"] == mode]) for mode in modes}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu_name(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        # NOTE: CPU timings are only comparable on an otherwise idle machine; the load says whether it was.
        info["load_average_1_5_15m"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a core dependency
        pass
    return info


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """One row per mode: quality, TTFT and token accounting."""
    header = ("| mode | n | accuracy | EM | F1 | TTFT mean ms | p50 ms | p95 ms | context tok/q | cached tok/q "
              "| prefilled tok/q | recomputed tok/q | encoded tok (run) | answer in passages |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for mode, s in summary.items():
        errors = f" ({s['errors']} too long)" if s["errors"] else ""
        lines.append(
            f"| {mode} | {s['n']}{errors} | {_fmt(s['accuracy'])} | {_fmt(s['em'])} | {_fmt(s['f1'])} "
            f"| {_fmt(s['ttft_ms_mean'])} | {_fmt(s['ttft_ms_p50'])} | {_fmt(s['ttft_ms_p95'])} "
            f"| {_fmt(s['context_tokens_mean'], 0)} | {_fmt(s['cached_tokens_mean'], 0)} "
            f"| {_fmt(s['prefilled_tokens_mean'], 0)} | {_fmt(s['recomputed_tokens_mean'], 0)} "
            f"| {s['encoded_tokens_total']} "
            f"| {_fmt(s['answer_in_passages'])} |")
    return "\n".join(lines)


def speedup_line(summary: dict[str, dict[str, Any]]) -> str | None:
    """Block vs full TTFT (p50) and the accuracy difference, when both modes ran."""
    block, full = summary.get("block"), summary.get("full")
    if not block or not full or not block["n"] or not full["n"]:
        return None
    ratio = full["ttft_ms_p50"] / block["ttft_ms_p50"] if block["ttft_ms_p50"] > 0 else math.inf
    return (f"block vs full: TTFT p50 {block['ttft_ms_p50']:.1f} ms vs {full['ttft_ms_p50']:.1f} ms "
            f"({ratio:.2f}x), accuracy {block['accuracy'] - full['accuracy']:+.1f} points")


def draw_chart(summary: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy / EM / F1 per mode (left) and TTFT per mode (right: mean bar, p50 dot, p95 whisker)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the evaluation chart needs matplotlib: pip install 'blockrag[eval]' "
                          "(or pass --no-chart)") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    modes = [m for m, s in summary.items() if s["n"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.26
    for i, (key, label) in enumerate((("accuracy", "accuracy"), ("em", "EM"), ("f1", "F1"))):
        xs = [j + (i - 1) * width for j in range(len(modes))]
        left.bar(xs, [summary[m][key] for m in modes], width, label=label)
    left.set_xticks(range(len(modes)), modes)
    left.set_ylim(0, 100)
    left.set_ylabel("%")
    left.set_title("answer quality")
    left.legend(loc="upper right", fontsize=8)
    means = [summary[m]["ttft_ms_mean"] for m in modes]
    p50 = [summary[m]["ttft_ms_p50"] for m in modes]
    p95 = [summary[m]["ttft_ms_p95"] for m in modes]
    right.bar(range(len(modes)), means, 0.5, color="tab:gray", label="mean")
    right.errorbar(range(len(modes)), p50, yerr=[[0] * len(modes), [b - a for a, b in zip(p50, p95)]], fmt="o",
                   color="black", capsize=6, label="p50 (dot) to p95")
    right.set_xticks(range(len(modes)), modes)
    right.set_ylabel("ms")
    right.set_title("time to first token")
    right.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_safe(value: Any) -> Any:
    """NaN (a mean over nothing) as null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(out_dir: str | Path, records: Sequence[dict[str, Any]], modes: Sequence[str], info: dict[str, Any],
                 *, extra: dict[str, Any] | None = None, chart: bool = True) -> dict[str, Any]:
    """Write ``summary.json``, ``table.md`` and (unless ``chart`` is False) ``chart.png``; return the summary."""
    out = Path(out_dir)
    summary = summarize(records, modes)
    model = info.get("model", {})
    data = info.get("data", {})
    title = (f"{model.get('name')} ({model.get('template')} template) on {Path(str(data.get('source'))).name}, "
             f"{len({r['id'] for r in records})} questions, k={info.get('settings', {}).get('k')}")
    document = {"title": title, "modes": summary, "run": info, "machine": machine(), **(extra or {})}
    (out / SUMMARY_FILE).write_text(json.dumps(_json_safe(document), indent=2, ensure_ascii=False, allow_nan=False)
                                    + "\n", encoding="utf-8")
    table = markdown_table(summary)
    footer = speedup_line(summary)
    (out / TABLE_FILE).write_text(f"{title}\n\n{table}\n" + (f"\n{footer}\n" if footer else ""), encoding="utf-8")
    if chart:
        draw_chart(summary, out / CHART_FILE, title)
    return document
