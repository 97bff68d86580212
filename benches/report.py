"""Writes benchmark results as Markdown (for benches/RESULTS.md).

    # run the default comparison and write the report (a few minutes; quiet machine please)
    python benches/report.py -o benches/RESULTS.md
    # the same, with bench options after "--"
    python benches/report.py -o benches/RESULTS.md -- --sizes 4096x128256 --repeat 5
    # render saved results: `ce-fast bench --json r.json` output, or pytest-benchmark's
    # `python -m pytest benches --benchmark-only --benchmark-json=b.json`
    python benches/report.py r.json -o benches/RESULTS.md
    python benches/report.py b.json -o benches/RESULTS.md

The ce-fast bench table (machine, command, times, GB/s, share of the read pass,
ratios to NumPy / PyTorch, peak memory) is rendered by ce_fast.bench.format_markdown,
so the terminal table and the file agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from ce_fast import bench, cli


def pytest_benchmark_markdown(data: dict) -> str:
    """Markdown of a pytest-benchmark JSON file: one table per group, ratios to ce_fast."""
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {}) if isinstance(m.get("cpu"), dict) else {}
    md = ["# ce_fast benchmark results (pytest-benchmark)", "", "## Machine", ""]
    for k, v in (
        ("cpu", cpu.get("brand_raw") or m.get("processor")),
        ("cores", cpu.get("count")),
        ("python", m.get("python_version")),
        ("platform", m.get("system")),
        ("release", m.get("release")),
        ("date", data.get("datetime")),
        ("commit", (data.get("commit_info") or {}).get("id")),
    ):
        if v:
            md.append(f"- **{k}**: {v}")
    md += ["", "## Command", "", "```", "python -m pytest benches --benchmark-only --benchmark-json=...", "```", ""]
    groups: dict = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or "", []).append(b)
    for g in sorted(groups):
        rows = sorted(groups[g], key=lambda b: b["stats"]["min"])
        ce = [b for b in rows if "ce_fast" in b["name"] and "inplace" not in b["name"]]
        ref = ce[0]["stats"]["min"] if ce else None
        md += [
            f"## {g}",
            "",
            "| benchmark | best ms | median ms | rounds | GB/s | time / ce_fast |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for b in rows:
            s = b["stats"]
            gbps = (b.get("extra_info") or {}).get("GB/s")
            ratio = f"{s['min'] / ref:.3g}x" if ref else "-"
            md.append(
                f"| {b['name']} | {s['min'] * 1e3:.4g} | {s['median'] * 1e3:.4g} | {s['rounds']} | "
                f"{'-' if gbps is None else f'{gbps:.1f}'} | {ratio} |"
            )
        md.append("")
    md += [
        "GB/s: logits bytes (fwd, read pass) or read + write bytes (fwd+bwd, copy) over the best round; "
        "time / ce_fast: relative to ce_fast's fresh-gradient / forward time in the group.",
        "",
    ]
    return "\n".join(md)


def render(data: dict) -> str:
    if data.get("schema", "").startswith("ce_fast.bench/"):
        return bench.format_markdown(data)
    if "benchmarks" in data:
        return pytest_benchmark_markdown(data)
    raise SystemExit("report.py: not a ce-fast bench or pytest-benchmark JSON file")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="benches/report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", help="results to render; without it, runs `ce-fast bench` first")
    p.add_argument("-o", "--output", default="-", help="Markdown file to write ('-': stdout)")
    ns = p.parse_args(argv)
    if ns.json:
        with open(ns.json) as f:
            data = json.load(f)
    else:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "results.json")
            rc = cli.main(["bench", *bench_args, "--json", path])
            if rc != 0:
                return rc
            with open(path) as f:
                data = json.load(f)
    text = render(data)
    if ns.output == "-":
        sys.stdout.write(text)
    else:
        with open(ns.output, "w") as f:
            f.write(text)
        print(f"wrote {ns.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
