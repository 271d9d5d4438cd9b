"""benchmarks/tradeoff_report.py on constructed points: the goal verdict, the Pareto front against the int8-only
curve and the claims' verdicts read the paired intervals the way the report says."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tradeoff_report as tr  # noqa: E402


def point(name, method, s1, s8, diff, lo, hi, metric=0.85, quant="fp32", model="single"):
    return dict(model=model, name=name, method=method, target="-", quant=quant, dir=name, metric=metric,
                reference=0.85, difference=diff, low=lo, high=hi, agreement=0.99, counts={}, notes={},
                fidelity=dict(agreement=0.99, mean_kl=0.001), speedup={"1": s1, "8": s8},
                p50_ms={"1": 10 / s1, "8": 50 / s8})


POINTS = [point("single-dense", "dense", 1.0, 1.0, 0, 0, 0),
          point("single-dense-int8", "int8 only", 2.1, 1.8, -0.3, -0.9, 0.3, 0.847, "int8 dynamic"),
          point("single-pt-2.5", "post-training", 2.6, 2.7, -0.9, -1.8, 0.0, 0.841),
          point("single-pt-3", "post-training", 3.2, 2.4, -0.5, -1.4, 0.4, 0.845),
          point("single-pt-4", "post-training", 4.0, 4.0, -3.0, -4.5, -1.6, 0.82)]


def test_goal_needs_both_batch_sizes_and_the_point_bound():
    best, met, moon = tr.goal(POINTS, "single")
    # pt-3 is faster at batch 1 but 2.4x at batch 8; pt-4 loses 3 points: pt-2.5 is the answer
    assert best["name"] == "single-pt-2.5" and met and not moon
    best, met, _ = tr.goal([p for p in POINTS if p["name"] != "single-pt-2.5"], "single")
    assert best["name"] == "single-pt-3" and not met


def test_pareto_front_and_int8_only_curve():
    front = [p["name"] for p in tr.pareto(tr.timed(POINTS, "single"), 1)]
    assert front == ["single-dense", "single-dense-int8", "single-pt-3", "single-pt-4"]
    baseline = [p for p in POINTS if p["method"] in ("dense", "int8 only")]
    assert tr.beats_int8_only(POINTS[3], baseline, 1)  # 3.2x at 0.845: faster than int8 (2.1x, 0.847)
    assert not tr.beats_int8_only(dict(POINTS[3], speedup={"1": 2.0, "8": 2.0}), baseline, 1)


def test_claim_verdicts_read_the_interval():
    keeps = dict(POINTS[2], low=-0.8, high=0.5)
    assert tr._keeps(keeps) == "confirmed"
    assert tr._keeps(POINTS[2]) == "inconclusive"  # [-1.8, 0.0] straddles -1
    assert tr._keeps(POINTS[4]) == "not confirmed"  # [-4.5, -1.6] lies below -1
    assert tr._beats(dict(low=0.1, high=2.0)) == "confirmed"
    assert tr._beats(dict(low=-2.0, high=-0.1)) == "contradicted"
    assert tr._beats(dict(low=-1.0, high=1.0)).startswith("inconclusive")


def test_report_renders(tmp_path):
    record = dict(points=POINTS, commands=["python benchmarks/tradeoff.py"], machine={}, run={},
                  args=dict(threads="2", fidelity_examples="1000", examples="512", kd_steps="200"))
    tr.write_report(record, tmp_path)
    text = (tmp_path / "tradeoff.md").read_text()
    assert "**single**: met" in text and (tmp_path / "tradeoff.png").stat().st_size > 0


def test_report_formats_the_load_and_lists_the_commands(tmp_path):
    commands = ["python benchmarks/tradeoff.py   # first", "python benchmarks/tradeoff.py --models single"]
    record = dict(points=POINTS, commands=commands, machine=dict(load_average=[2.11328125, 1.75048828125, 2.4]),
                  run={}, args=dict(threads="2", fidelity_examples="1000", examples="512", kd_steps="200"))
    tr.write_report(record, tmp_path)
    lines = (tmp_path / "tradeoff.md").read_text().splitlines()
    start = lines.index("```bash")
    assert lines[start + 1:start + 4] == [*commands, "```"]  # one command per line, in a code block
    assert "(load average at timing: 2.11 / 1.75 / 2.40)" in "\n".join(lines)
    assert tr.load_average(None) == "?"


def test_goal_is_judged_per_thread_count_on_the_slowest_run(tmp_path):
    runs = [dict(threads=2, speedup={"1": 3.3, "8": 3.4}), dict(threads=2, speedup={"1": 2.4, "8": 2.6}),
            dict(threads=1, speedup={"1": 3.5, "8": 3.3}), dict(threads=1, speedup={"1": 3.4, "8": 3.2})]
    pts = [dict(p, timing_runs=runs if p["name"] == "single-pt-2.5" else []) for p in POINTS]
    best, met, moon = tr.goal(pts, "single", 1)
    assert best["name"] == "single-pt-2.5" and met and moon  # slowest 1-thread run: 3.2x
    best, met, _ = tr.goal(pts, "single", 2)
    assert not met  # the 2-thread run at 2.4x decides
    record = dict(points=pts, commands=[], machine={}, run={},
                  args=dict(threads="2", fidelity_examples="1000", examples="512", kd_steps="200"))
    tr.write_report(record, tmp_path)
    text = (tmp_path / "tradeoff.md").read_text()
    assert "**single** at 1 thread: met (moonshot 3x met too)" in text and "**single** at 2 threads: not met" in text
    assert "3.40x / 3.20x" in text  # the latest 1-thread run in the table's extra column


def test_claims_at_two_budgets_sit_together_with_each_budget_from_its_notes():
    def claim(name, diff, lo, hi, steps, tag=""):
        return dict(point(name, "head-importance", 1, 1, diff, lo, hi), notes=dict(train_steps=steps, tag=tag))

    points = [claim("single-head-importance-heads", -6.0, -8.4, -3.4, 200),
              dict(point("single-sparse-adapter-0.0", "sparse-adapter (snip)", 1, 1, 0, 0, 0),
                   notes=dict(train_steps=400)),
              claim("single-head-importance-heads-long", -0.4, -0.9, 0.2, 2000, "long")]
    args = dict(claim_steps="200", sparse_steps="400", probe_steps="200", mask_steps="400", lottery_steps="150")
    rows = tr.claims(points, args)
    assert [r[1] for r in rows] == ["not confirmed", "confirmed"]  # [-0.9, +0.2] lies above -1
    assert "200 steps" in rows[0][3] and "2000 steps (0.48 epoch)" in rows[1][3]
    assert tr.claim_tags(points) == ["", "long"]


def test_two_kd_budgets_of_one_target_are_told_apart(tmp_path):
    kd = [dict(point(f"single-pt-2.0-kd{s}", "post-training + KD", 2.6, 2.7, d, d - 1, d + 1), target="speedup=2.0",
               notes=dict(kd_steps=s)) for s, d in ((300, -1.9), (900, -0.5))]
    record = dict(points=POINTS[:2] + kd, commands=[], machine={}, run={}, args=dict(threads="2"))
    tr.write_report(record, tmp_path)
    text = (tmp_path / "tradeoff.md").read_text()
    assert "| post-training + KD 300 steps | speedup=2.0 |" in text
    assert "| post-training + KD 900 steps | speedup=2.0 |" in text
    assert "the fastest graph within 1 point is post-training + KD 900 steps speedup=2.0" in text


def test_a_second_search_of_one_target_is_told_apart(tmp_path):
    """Two post-training searches of one target found different masks: the report says what each kept."""
    first = dict(point("single-pt-2.0", "post-training", 2.0, 2.0, -1.8, -3.0, -0.6), target="speedup=2.0",
                 notes=dict(flops_fraction=0.48, predicted_speedup=2.01))
    second = dict(point("single-pt-2.0-search2", "post-training", 2.1, 2.0, -1.9, -3.1, -0.7),
                  target="speedup=2.0 (2nd search)", notes=dict(flops_fraction=0.54, predicted_speedup=2.0))
    record = dict(points=POINTS[:2] + [first, second], commands=[], machine={}, run={}, args=dict(threads="2"))
    tr.write_report(record, tmp_path)
    text = (tmp_path / "tradeoff.md").read_text()
    assert "| post-training | speedup=2.0 (2nd search) |" in text
    assert ("single `speedup=2.0 (2nd search)`: the post-training search run again (current code and cached latency "
            "table) for a KD student; it kept 54% of the FLOPs (predicted 2.00x) where the first search kept 48% "
            "(2.01x)") in text
