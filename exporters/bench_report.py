"""Writers for a `compress bench` report: report.json (the schema is in README.md), report.md and latency.png."""

from __future__ import annotations

import json
from pathlib import Path

STATS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms")

# The busy-machine rule (report.md, `compress bench` and `compress demo` warn when it holds):
OTHER_CORES_SHARE = 0.10  # other processes kept more than max(0.25, 10% of the cores) busy on average while timing
OTHER_CORES_MIN = 0.25
BUSY_RULE = ("busy = while timing, other processes kept more than max(0.25, 10% of the cores) busy on average "
             "(Linux /proc/stat minus this process's CPU time; elsewhere: 1-minute load average before timing "
             ">= half the cores)")
# Apart from load: a speedup whose per-round interquartile range is wider than 10% of its median is unsteady (a
# quiet machine shows it too, e.g. int8 kernels at batch 1), so it gets its own note, not the busy warning.
SPREAD_LIMIT = 0.10
UNSTEADY_RULE = "unsteady = a speedup's per-round interquartile range is wider than 10% of its median"


def write_report(report: dict, directory: Path) -> None:
    directory = Path(directory)
    (directory / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (directory / "report.md").write_text(markdown(report))
    plot_latency(report, directory / "latency.png")


def _num(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _md(text) -> str:
    """A table cell: a '|' in a path or an error message would end the cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def speedup_text(c: dict) -> str:
    """"1.48x" or, with the per-round ratios, "1.48x (1.45-1.52)": p50 ratio (interquartile range over rounds)."""
    if not c.get("speedup_p50"):
        return "-"
    r = c.get("speedup_rounds")
    if not r or r["rounds"] < 2:
        return f"{c['speedup_p50']:.2f}x"
    return f"{c['speedup_p50']:.2f}x ({r['q1']:.2f}–{r['q3']:.2f})"


def busy_reasons(report: dict) -> list:
    """Why the timings of this report may be skewed by other work on the machine (BUSY_RULE); [] when quiet."""
    reasons, timing = [], report.get("timing") or {}
    cores = timing.get("cpu_count") or report["machine"].get("cpu_count") or 1
    other = timing.get("other_cpu_cores")
    if other is not None:
        limit = max(OTHER_CORES_MIN, OTHER_CORES_SHARE * cores)
        if other > limit:
            reasons.append(f"other processes kept {other:.2f} of {cores} cores busy on average while timing "
                           f"(limit {limit:.2f})")
    else:
        load = timing.get("load_average_before", (report["machine"].get("load_average") or [None])[0])
        if load is not None and load >= max(1.0, cores / 2):
            reasons.append(f"1-minute load average {load:.2f} on {cores} cores before timing")
    return reasons


def unsteady_reasons(report: dict) -> list:
    """The speedups whose per-round spread is wide (UNSTEADY_RULE), as one line; [] when all are steady."""
    wide = []
    for c in report["results"]:
        r = c.get("speedup_rounds")
        if c["status"] == "ok" and r and r["rounds"] >= 2 and r["median"] > 0 \
                and (r["q3"] - r["q1"]) > SPREAD_LIMIT * r["median"]:
            wide.append(f"{c['target']} {c['provider']} b{c['batch_size']}x{c['seq_len']}: "
                        f"{r['median']:.2f}x, IQR {r['q1']:.2f}–{r['q3']:.2f}")
    if not wide:
        return []
    return ["speedups varied over the rounds by more than 10% (" + "; ".join(wide[:3])
            + (f"; {len(wide) - 3} more" if len(wide) > 3 else "") + ")"]


def not_run(report: dict) -> list:
    """Skipped and failed cells grouped by (target, provider, status, reason): [(..., shapes)]."""
    groups = {}
    for c in report["results"]:
        if c["status"] != "ok":
            key = (c["target"], c["provider"], c["status"], c["reason"])
            groups.setdefault(key, []).append(f"{c['batch_size']}x{c['seq_len']}")
    n_shapes = len(report["config"]["batch_sizes"]) * len(report["config"]["seq_lens"])
    return [(*key, "all shapes" if len(shapes) == n_shapes else ", ".join(shapes)) for key, shapes in groups.items()]


def markdown(report: dict) -> str:
    cfg, m = report["config"], report["machine"]
    lines = ["# Benchmark report", "",
             f"{report['created']}; {cfg['threads']} threads, {cfg['warmup']} warm-up runs, then at least "
             f"{cfg['min_repeats']} runs and {cfg['min_time_s']} s per cell; inputs: random ids, no padding "
             f"(seed {cfg['seed']}). Per provider and shape the targets were timed in turn, in rounds of one short "
             f"slice each (about {cfg.get('rounds', 1)} rounds, more when the minimum run count needs them), so load "
             f"that comes and goes hits them alike. Latency in ms per batch over all timed runs; seq/s = batch / "
             f"mean; speedup = p50 of the first target ({report['targets'][0]['name']}) / p50 of the row, same "
             f"provider and shape, and in brackets the interquartile range of the same ratio per round "
             f"(slice medians). Paths: {report.get('paths', 'as given')}.", ""]
    busy = busy_reasons(report)
    if busy:
        lines += ["**The machine was busy while timing**: " + "; ".join(busy) + ". Latencies and speedups may "
                  "be skewed; compare with a run on a quiet machine (" + BUSY_RULE + ").", ""]
    unsteady = unsteady_reasons(report)
    if unsteady:
        lines += ["**Unsteady speedups**: " + "; ".join(unsteady) + ". Read their last digit with care ("
                  + UNSTEADY_RULE + ").", ""]

    seq_lens = cfg["seq_lens"]
    lines += ["## Targets", "",
              "| target | kind | size MB | parameters | " + " | ".join(f"FLOPs/token (seq {s})" for s in seq_lens) + " |",
              "|---|---|---:|---:|" + "---:|" * len(seq_lens)]
    for t in report["targets"]:
        flops = t["flops_per_token"] or {}
        size = f"{t['size_bytes'] / 1e6:.2f}" if t["size_bytes"] is not None else "-"
        lines.append(f"| {_md(t['name'])} | {t['kind']} | {size} | {_num(t['parameters'])} | "
                     + " | ".join(_num(flops.get(str(s))) for s in seq_lens) + " |")
    lines.append("")

    for provider, full_name in report["providers"].items():
        rows = [c for c in report["results"] if c["provider"] == provider and c["status"] == "ok"]
        lines += [f"## {provider} ({full_name})", ""]
        if not rows:
            lines += ["No cell ran on this provider (see Skipped and failed).", ""]
            continue
        lines += ["| target | batch | seq | p50 | p90 | p99 | mean | std | seq/s | runs | rounds | speedup p50 "
                  "(per-round IQR) | per-round min–max |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in rows:
            r = c.get("speedup_rounds")
            span = f"{r['min']:.2f}–{r['max']:.2f}" if r and c["speedup_p50"] else "-"
            lines.append(f"| {_md(c['target'])} | {c['batch_size']} | {c['seq_len']} | "
                         + " | ".join(f"{c[k]:.3f}" for k in STATS) + f" | {c['seq_per_s']:.1f} | {c['repeats']} | "
                         f"{c.get('rounds', '-')} | {speedup_text(c)} | {span} |")
        lines.append("")

    placements = [(t["name"], p, v) for t in report["targets"] for p, v in t["placement"].items()]
    if placements:
        lines += ["## Node placement", "", "Nodes per execution provider in one profiled run; ops that fell back to "
                  "the CPU when another provider was asked for.", "",
                  "| target | provider | nodes per provider | CPU fallback ops |", "|---|---|---|---|"]
        for name, provider, v in placements:
            if "error" in v:
                lines.append(f"| {_md(name)} | {provider} | profiling failed: {_md(v['error'])} | |")
                continue
            nodes = ", ".join(f"{k}: {n}" for k, n in v["nodes"].items())
            fallback = ", ".join(f"{k} x{n}" for k, n in v["cpu_fallback_ops"].items()) or "none"
            lines.append(f"| {_md(name)} | {provider} | {nodes} | {fallback} |")
        lines.append("")

    skipped = not_run(report)
    if skipped:
        lines += ["## Skipped and failed", "", "| target | provider | status | shapes | reason |", "|---|---|---|---|---|"]
        lines += [f"| {_md(t)} | {p} | {status} | {shapes} | {_md(reason)} |" for t, p, status, reason, shapes in skipped]
        lines.append("")

    timing = report.get("timing")
    if timing:
        other = timing.get("other_cpu_cores")
        lines += ["## Load while timing", "",
                  f"{timing['timed_s']} s of timing; 1-minute load average {timing['load_average_before']} before, "
                  f"{timing['load_average_after']} after (this run's own threads count in it); other processes: "
                  + (f"{other:.2f} cores busy on average" if other is not None else "not measurable here")
                  + f" of {timing['cpu_count']}. Rules: {BUSY_RULE}; {UNSTEADY_RULE}.", ""]
    lines += ["## Machine", ""]
    lines += [f"- {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def plot_latency(report: dict, path: Path) -> None:
    """Grouped bars: p50 latency per (target, provider) at each shape; whiskers reach p90."""
    # Figure without pyplot: the Agg canvas, no global state, no display needed
    from matplotlib.figure import Figure

    cfg = report["config"]
    shapes = [(b, s) for b in cfg["batch_sizes"] for s in cfg["seq_lens"]]
    cells = {(c["target"], c["provider"], c["batch_size"], c["seq_len"]): c
             for c in report["results"] if c["status"] == "ok"}
    series = list(dict.fromkeys((t, p) for t, p, _, _ in cells))
    fig = Figure(figsize=(max(6.0, 1.2 * len(shapes) * max(1, len(series)) ** 0.5 + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    if not series:
        ax.text(0.5, 0.5, "no successful measurements (see report.md)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    else:
        width = 0.8 / len(series)
        values = [c["p50_ms"] for c in cells.values()]
        for i, (target, provider) in enumerate(series):
            xs, p50, err = [], [], []
            for j, (b, s) in enumerate(shapes):
                c = cells.get((target, provider, b, s))
                if c is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    p50.append(c["p50_ms"])
                    err.append(c["p90_ms"] - c["p50_ms"])
            label = target if len(report["providers"]) == 1 else f"{target} ({provider})"
            ax.bar(xs, p50, width, yerr=[[0] * len(err), err], capsize=2, label=label)
        ax.set_xticks(range(len(shapes)), [f"batch {b}\nseq {s}" for b, s in shapes])
        if max(values) / max(min(values), 1e-9) > 20:  # a wide range: small shapes vanish on a linear axis
            ax.set_yscale("log")
        ax.set_ylabel("p50 latency per batch (ms), whisker to p90")
        ax.set_xlabel("input shape")
        ax.set_title(f"Latency per target ({cfg['threads']} threads)")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
