"""bench/reruns.py: two runs of a timing agree when their medians differ by no more than each run's spread."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.reruns import agreement, timings  # noqa: E402


def test_agreement_within_each_runs_spread():
    a = {"median": 1.0, "min": 0.9, "max": 1.2}
    assert agreement(a, {"median": 1.1, "min": 1.0, "max": 1.3})["agree"]
    narrow = agreement({"median": 1.0, "min": 0.98, "max": 1.02}, {"median": 1.1, "min": 1.0, "max": 1.3})
    assert not narrow["agree"] and not narrow["medians_inside"] and abs(narrow["median_change"] - 0.1) < 1e-12
    loose = agreement({"median": 1.0, "min": 0.5, "max": 1.05}, {"median": 1.3, "min": 1.2, "max": 1.6})
    assert loose["agree"] and not loose["medians_inside"]  # the stricter test can fail where spreads are wide


def test_timings_read_both_benchmarks_json():
    memory = {
        "rows": [
            {"method": m, "num_steps": 10, "step_seconds": s, "step_seconds_min": s - 1, "step_seconds_max": s + 1}
            for m, s in (("leapalign", 5.0), ("full", 12.0))
        ],
        "ratios": [{"num_steps": 10, "step_seconds_ratio_paired": {"median": 2.4, "min": 2.0, "max": 2.8}}],
    }
    t = timings("memory", memory)
    assert t["full N=10 step s"] == {"median": 12.0, "min": 11.0, "max": 13.0}
    assert t["full/leapalign N=10 paired"]["median"] == 2.4
    sampler = {
        "rows": [
            {
                "variant": v,
                "resolution": 64,
                "seconds_median": s,
                "seconds_min": s,
                "seconds_max": s,
                "time_ratio_vs_flux_pipeline_eager": {"median": r, "min": r, "max": r},
            }
            for v, s, r in (("flux_pipeline_eager", 0.2, 1.0), ("ours_eager", 0.1, 0.5))
        ]
    }
    t = timings("sampler", sampler)
    assert set(t) == {"flux_pipeline_eager 64px s", "ours_eager 64px s", "ours_eager/flux_pipeline_eager 64px paired"}
