"""Summarise a pytest-benchmark JSON (default: the newest under .benchmarks/) as Markdown and a bar chart.

    python -m benchmarks.report [results.json] [--out benchmarks/report]
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
    """'test_knn[torch-128-cpu]' -> 'knn[torch-128-cpu]'."""
    return bench["name"].removeprefix("test_")


def summarise(data: dict) -> tuple[str, dict]:
    groups: dict[str, list] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    lines = ["# fastclr benchmarks\n",
             f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
             f"{data['machine_info'].get('cpu', {}).get('count', '?')} CPUs; saved {data['datetime']}; "
             f"commit {data.get('commit_info', {}).get('id', '?')[:10]}.\n",
             "Speed-ups are relative to the slowest row of each group, all measured in this one run.\n"]
    for group, rows in sorted(groups.items()):
        rows.sort(key=lambda b: b["stats"]["mean"])
        slowest = max(b["stats"]["mean"] for b in rows)
        lines += [f"\n## {group}\n",
                  "| case | mean (s) | median (s) | rounds | throughput | x slowest | peak MiB | accuracy |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for b in rows:
            unit, value = throughput(b.get("extra_info", {}))
            peak = b.get("extra_info", {}).get("peak_mib")
            acc = b.get("extra_info", {}).get("accuracy")
            lines.append(f"| {label(b)} | {b['stats']['mean']:.4f} | {b['stats']['median']:.4f} | "
                         f"{b['stats']['rounds']} | {f'{value:,.0f} {unit}' if unit else '-'} | "
                         f"{slowest / b['stats']['mean']:.2f} | {f'{peak:.0f}' if peak is not None else '-'} | "
                         f"{f'{acc:.4f}' if acc is not None else '-'} |")
    return "\n".join(lines) + "\n", groups


def plot(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(groups)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 2.2 + 0.45 * max(len(g) for g in groups.values()) * rows),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        bs = sorted(groups[name], key=lambda b: b["stats"]["mean"], reverse=True)
        unit = throughput(bs[0].get("extra_info", {}))[0]
        vals = [throughput(b.get("extra_info", {}))[1] or 1 / b["stats"]["mean"] for b in bs]
        ax.barh([label(b) for b in bs], vals, color="tab:blue")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(unit or "runs/s")
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", nargs="?", help="pytest-benchmark JSON (default: newest in .benchmarks/)")
    p.add_argument("--out", default="benchmarks/report")
    args = p.parse_args(argv)
    src = Path(args.result) if args.result else newest_result()
    md, groups = summarise(json.loads(src.read_text()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(md)
    plot(groups, out / "throughput.png")
    print(md)
    print(f"wrote {out / 'summary.md'} and {out / 'throughput.png'} (from {src})")


if __name__ == "__main__":
    main()
