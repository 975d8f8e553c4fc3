"""Summarise a pytest-benchmark JSON (default: the newest under .benchmarks/) as Markdown and a bar chart.

    python -m benchmarks.report [results.json] [--out benchmarks/report] [--machine NAME] [--runs metrics.json ...]

Each group's rows carry a speed-up against the group's baseline (the row a benchmark marked with
``describe(..., baseline=True)``: the reference loss, Kornia's chain, ATen, scikit-learn, ...).
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path


def newest_result(root: Path = Path(".benchmarks")) -> Path:
    files = sorted(root.glob("*/*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit("no saved benchmark run under .benchmarks/: run `make bench` first")
    return files[-1]


def throughput(extra: dict) -> tuple[str, float] | tuple[None, None]:
    for key, value in extra.items():
        if key.endswith("_per_second") and value is not None:
            return key.replace("_per_second", "/s"), value
    return None, None


def label(bench: dict) -> str:
    """What a reader sees: the case the benchmark described ("triton kernels"), else its test id."""
    return bench.get("extra_info", {}).get("case") or bench["name"].removeprefix("test_")


def baseline_of(rows: list) -> dict | None:
    return next((b for b in rows if b.get("extra_info", {}).get("baseline")), None)


def rate(bench: dict) -> float:
    """Throughput where the benchmark recorded one (cases of one group may differ in batch size), else runs/s."""
    return throughput(bench.get("extra_info", {}))[1] or 1 / bench["stats"]["mean"]


def speedup(bench: dict, base: dict | None) -> float | None:
    """How many times the group's baseline throughput (same run, same machine)."""
    return rate(bench) / rate(base) if base else None


def summarise(data: dict) -> tuple[str, dict]:
    groups: dict[str, list] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    cpu = data["machine_info"].get("cpu", {})
    lines = ["# fastclr benchmarks\n",
             f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} CPUs"
             f"{', ' + data['machine_info']['cuda_device'] if data['machine_info'].get('cuda_device') else ''}; run {data['datetime'][:19]} UTC; "
             f"commit {data.get('commit_info', {}).get('id', '?')[:10]}.\n",
             "Speed-ups are against each group's baseline (marked), measured in this one run.\n"]
    for group, rows in sorted(groups.items()):
        rows.sort(key=rate, reverse=True)
        base = baseline_of(rows)
        lines += [f"\n## {group}\n",
                  f"| case | mean (s) | median (s) | rounds | throughput | x {label(base) if base else '-'} | "
                  "peak MiB | accuracy |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for b in rows:
            unit, value = throughput(b.get("extra_info", {}))
            peak = b.get("extra_info", {}).get("peak_mib")
            acc = b.get("extra_info", {}).get("accuracy")
            x = speedup(b, base)
            lines.append(f"| {label(b)}{' (baseline)' if b is base else ''} | {b['stats']['mean']:.4f} | "
                         f"{b['stats']['median']:.4f} | {b['stats']['rounds']} | "
                         f"{f'{value:,.0f} {unit}' if unit else '-'} | {f'{x:.2f}' if x else '-'} | "
                         f"{f'{peak:.0f}' if peak is not None else '-'} | {f'{acc:.4f}' if acc is not None else '-'} |")
    return "\n".join(lines) + "\n", groups


def runs_table(paths: list[Path]) -> str:
    """The training runs' metrics.json files (``fastclr.train``/``fastclr.speedrun``) as one Markdown table: the
    whole run's images/s beside the steady-state figure (warm-up, capture and compilation left out), so the two
    ways to get CUDA graphs (--cuda-graph, --compile-mode reduce-overhead) compare on the steps that repeat."""
    lines = ["\n## Training runs\n",
             "| run | batch | step | steps | training s | images/s, whole run | images/s, steady state (steps) | "
             "time to target s | k-NN |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in paths:
        m = json.loads(path.read_text())
        cfg = m.get("config", {})
        step = ("--cuda-graph" if cfg.get("cuda_graph") else
                f"compile {cfg.get('compile_mode', 'default')}" if cfg.get("compile") else "eager")
        steady, span = m.get("steady_images_per_second"), m.get("steady_state_steps")
        target, knn = m.get("time_to_target_seconds"), m.get("knn_accuracy")
        lines.append(f"| {path.stem} | {cfg.get('batch_size', '-')} | {step} | {m['steps']} | {m['train_seconds']:.2f} | "
                     f"{m['train_images_per_second']:,.0f} | "
                     f"{f'{steady:,.0f} ({span[0]}-{span[1]})' if steady else '-'} | "
                     f"{f'{target:.2f}' if target is not None else '-'} | {f'{knn:.4f}' if knn is not None else '-'} |")
    return "\n".join(lines) + "\n"


def _bar_text(bench: dict, base: dict | None) -> str:
    if bench is base:
        return "baseline"
    x = speedup(bench, base)
    return f"{x:.2f}x" if x else ""


def plot(groups: dict, path: Path) -> None:
    """One panel per group that compares something (two rows or more): throughput bars, each labelled with its
    speed-up against the group's baseline; a log axis where the group spans more than 100x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    names = sorted(g for g in groups if len(groups[g]) >= 2)
    if not names:
        return
    cols = 2
    rows = math.ceil(len(names) / cols)
    height = max(len(groups[g]) for g in names)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, (0.9 + 0.38 * height) * rows + 0.6), squeeze=False)
    for ax, name in zip(axes.flat, names):
        bs = sorted(groups[name], key=rate)              # barh draws bottom-up: the fastest ends on top
        base = baseline_of(bs)
        unit = throughput(bs[0].get("extra_info", {}))[0] or "runs/s"
        vals = [rate(b) for b in bs]
        colours = ["tab:grey" if b is base else "tab:blue" for b in bs]
        ax.barh(range(len(bs)), vals, color=colours)
        ax.set_yticks(range(len(bs)), [label(b) for b in bs], fontsize=8)
        if max(vals) / min(vals) > 100:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_major_locator(plt.MaxNLocator(4) if ax.get_xscale() == "linear" else ax.xaxis.get_major_locator())
        for i, (b, v) in enumerate(zip(bs, vals)):
            ax.text(v, i, " " + _bar_text(b, base), va="center", fontsize=8)
        ax.set_xlim(right=max(vals) * (3 if ax.get_xscale() == "log" else 1.25))
        ax.set_title(name + (f"  (vs {label(base)})" if base else ""), fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", nargs="*", help="pytest-benchmark JSON files, merged (default: newest in .benchmarks/)")
    p.add_argument("--out", default="benchmarks/report")
    p.add_argument("--machine", default=None,
                   help="also write the tables and the chart to benchmarks/results/MACHINE.{md,png} (committed: "
                        "one pair per machine)")
    p.add_argument("--runs", nargs="*", default=[],
                   help="training runs' metrics.json files, tabled after the benchmark groups (missing ones skipped)")
    args = p.parse_args(argv)
    srcs = [Path(r) for r in args.result if Path(r).is_file()] if args.result else [newest_result()]
    if not srcs:
        raise SystemExit(f"none of {', '.join(args.result)} exists")
    data = json.loads(srcs[0].read_text())
    for extra in srcs[1:]:      # one report from several runs (a stage that timed out leaves no file)
        data["benchmarks"] += json.loads(extra.read_text())["benchmarks"]
    src = ", ".join(map(str, srcs))
    md, groups = summarise(data)
    runs = [Path(r) for r in args.runs if Path(r).is_file()]
    if runs:
        md += runs_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md)
    plot(groups, out / "throughput.png")
    if args.machine:
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        (results / f"{args.machine}.md").write_text(md)
        plot(groups, results / f"{args.machine}.png")
    print(md)
    print(f"wrote {out / 'summary.md'} and {out / 'throughput.png'} (from {src})")


if __name__ == "__main__":
    main()
