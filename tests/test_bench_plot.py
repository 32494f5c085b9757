"""The benchmark's PNG: built through the function, checked by its elements and their extents."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a program beside the package, not installed
    sys.path.insert(0, str(ROOT))

from bench_synthetic import CPU_LIMITS, QUIET, _cpu_rows, _env, _row  # noqa: E402


# -- the plot: built through the function, checked by its elements ---------------------------
def test_plot_has_linear_epoch_times_a_compute_floor_and_the_read_limit(tmp_path):
    import matplotlib.pyplot as plt

    from bench.goals import assess
    from bench.plot import build_figure, plot

    rows = list(_cpu_rows().values())
    rows[1]["disturbed_runs"], rows[1]["other_load_max"] = 1, 0.2
    fig = build_figure(_env(), rows, CPU_LIMITS, assess(_cpu_rows(), QUIET), {"gds": "no GPU"})
    try:
        e2e, lo = fig.axes[0], fig.axes[1]
        assert e2e.get_xscale() == "linear" and "seconds per epoch" in e2e.get_xlabel()
        gids = {a.get_gid() for ax in fig.axes for a in ax.get_children()} | {
            t.get_gid() for t in fig.texts}
        assert {"e2e:sequential", "e2e:fallback", "e2e:compute-only", "floor",
                "lo:sequential", "lo:fallback", "read-limit", "verdict", "command"} <= gids
        assert "lo:compute-only" not in gids
        floor = next(a for a in e2e.get_lines() if a.get_gid() == "floor")
        assert floor.get_xdata()[0] == pytest.approx(2.0)
        limit = next(a for a in lo.get_lines() if a.get_gid() == "read-limit")
        assert limit.get_xdata()[0] == 100 and "3.00 GB/s" in limit.get_label()
        bars = {p.get_gid(): p for p in lo.patches}
        fb_pct = 100 * rows[1]["loader_only"]["gb_per_s"] * 1e9 / 3.0e9
        assert bars["lo:fallback"].get_width() == pytest.approx(min(fb_pct, 150))
        e2e_bars = {p.get_gid(): p for p in e2e.patches}
        assert e2e_bars["e2e:fallback"].get_hatch() == "xx"  # disturbed
        assert e2e_bars["e2e:sequential"].get_hatch() is None
        texts = [t.get_text() for t in fig.texts]
        assert "clean measurement" in texts and any("--plot x.png" in t for t in texts)
        assert "CPU: test" in fig._suptitle.get_text()
        assert any("DISTURBED" in t.get_text() for t in e2e.texts)
    finally:
        plt.close(fig)
    bad = assess(_cpu_rows(compute_wall=7.56), QUIET)
    fig = build_figure(_env(), list(_cpu_rows(compute_wall=7.56).values()), CPU_LIMITS, bad, {})
    try:
        assert any(t.get_text().startswith("INCONCLUSIVE") for t in fig.texts)
    finally:
        plt.close(fig)
    plot(tmp_path / "p.png", _env(), rows, CPU_LIMITS, bad, {})
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"



def test_plot_labels_stay_inside_their_panels_and_the_axis_fits_the_longest_bar():
    """A disturbed 13 s bar once got a 25 s axis, and a label ran off the plot."""
    import matplotlib.pyplot as plt

    from bench.goals import assess
    from bench.plot import build_figure

    rows = list(_cpu_rows().values())
    rows[0] = _row("sequential", 13.0, 0.02, spread=0.04)
    rows[0]["disturbed_runs"], rows[0]["other_load_max"] = 2, 0.31
    rows[1]["loader_only"]["gb_per_s"] = 3.3  # 110 % of the limit: above it, and said so
    rows.insert(2, _row("torch-dataloader", 12.0, 0.0004, name="torch-dataloader[w=0,pin=0]"))
    rows[2]["config"] = {"zero_copy_views": True}
    rows[2]["loader_only"]["gb_per_s"] = 200.0  # far off the axis
    fig = build_figure(_env(), rows, CPU_LIMITS, assess(_cpu_rows(), QUIET), {"gds": "no GPU"})
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        whole = fig.bbox
        for t in fig.texts + [t for ax in fig.axes for t in ax.texts + [ax.title]]:
            if not t.get_text():
                continue
            bb = t.get_window_extent(r)
            assert whole.x0 - 1 <= bb.x0 and bb.x1 <= whole.x1 + 1, t.get_text()
        for ax in fig.axes[:2]:
            box = ax.get_window_extent(r)
            labels = [t for t in ax.texts if (t.get_gid() or "").startswith("label:")]
            assert labels
            right = max(t.get_window_extent(r).x1 for t in labels)
            for t in labels:
                bb = t.get_window_extent(r)
                assert box.x0 - 1 <= bb.x0 and bb.x1 <= box.x1 + 1, t.get_text()
            # tight: the rightmost label ends near the right edge (no half-empty axis)
            assert right >= box.x1 - 0.15 * box.width
        e2e, lo = fig.axes[0], fig.axes[1]
        assert 13.0 * 1.0 < e2e.get_xlim()[1] < 13.0 * 1.6
        fb = next(t for t in lo.texts if t.get_gid() == "label:fallback")
        assert "110 %" in fb.get_text() and "above the measured limit" in fb.get_text()
    finally:
        plt.close(fig)
