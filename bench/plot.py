"""The benchmark's PNG, for a reader who looks at it for ten seconds.

Owns: :func:`build_figure` (a matplotlib Figure) and :func:`plot` (writes it). Left panel:
end-to-end epoch time per loader on a linear axis (median, whiskers min–max over the
repetitions), compute-only drawn as the floor line, runs disturbed by other load hatched and
labelled. Right panel: each loader's loader-only throughput as a percentage of the measured read
limit (100 % = the line). The title names the device, the command and the measurement's
verdict (clean, or INCONCLUSIVE and why). Artists carry ``gid``s (``e2e:<name>``, ``floor``,
``lo:<name>``, ``read-limit``, ``verdict``) so tests can check the figure without pixels.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

BLUE, LIGHT, GREY, RED, GREEN = "#3b6fb6", "#9cc3e6", "#9a9a9a", "#c0392b", "#2a7d3a"
#: Loader-only bars are drawn up to this percentage of the read limit (the label gives the value).
LO_CAP_PCT = 150.0


def _label(r: dict) -> str:
    if r["family"] == "torch-dataloader":
        return "torch-dataloader\n" + r["name"].split("[", 1)[-1].rstrip("]")
    return r["name"]


def _read_limit(limits: dict, cold: bool) -> tuple[float | None, str]:
    key = "read_cold_bytes_per_s" if cold else "read_warm_bytes_per_s"
    return limits.get(key), ("cold" if cold else "warm") + " read → memory"


def build_figure(env: dict, rows: list[dict], limits: dict, quality: dict | None,
                 skipped: dict[str, str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("wall_s")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 0.6 * len(rows) + 4.2),
                                 gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))[::-1]  # first row on top
    names = [_label(r) for r in rows]

    # -- end-to-end: seconds per epoch, linear ----------------------------------------------
    top = 0.0
    labels1: list = []
    labels2: list = []
    for yi, r in zip(y, rows):
        runs = r.get("wall_s_runs") or [r["wall_s"]]
        lo, hi, med = min(runs), max(runs), r["wall_s"]
        top = max(top, hi)
        compute = r["family"] == "compute-only"
        bad = bool(r.get("disturbed_runs"))
        bar = a1.barh(yi, med, 0.6, color=GREY if compute else BLUE,
                      hatch="xx" if bad else None, edgecolor=RED if bad else "none",
                      gid=f"e2e:{r['name']}")
        a1.errorbar(med, yi, xerr=[[max(0.0, med - lo)], [max(0.0, hi - med)]], fmt="none",
                    ecolor="black",
                    capsize=4, lw=1, gid=f"whisker:{r['name']}")
        text = f" {med:.3g} s"
        if r.get("stall_fraction") is not None and not compute:
            text += f" · stall {100 * r['stall_fraction']:.0f} %"
        if bad:
            text += f"\n DISTURBED: {r['disturbed_runs']} run(s),\n other load " \
                    f"{100 * (r.get('other_load_max') or 0):.0f} %"
        labels1.append(a1.annotate(text, (hi, yi), va="center", ha="left", fontsize=8,
                                   color=RED if bad else "black", gid=f"label:{r['name']}"))
        del bar
    c = next((r for r in rows if r["family"] == "compute-only"), None)
    ylim = (-0.6, len(rows) - 0.1)
    if c is not None:
        a1.axvline(c["wall_s"], color="#555555", ls="--", lw=1.2, gid="floor",
                   label=f"compute-only floor: {c['wall_s']:.3g} s")
        labels1.append(a1.annotate(
            f"compute-only floor {c['wall_s']:.3g} s\n(batches already resident)",
            (c["wall_s"], ylim[1]), ha="left", va="top", fontsize=8, color="#333333",
            bbox={"boxstyle": "round", "fc": "white", "ec": "#999999"}, gid="label:floor"))
    a1.set_ylim(*ylim)
    a1.set_yticks(y, names, fontsize=9)
    a1.set_xlabel("seconds per epoch (shorter is better)")
    reps = max((len(r.get("wall_s_runs") or [1]) for r in rows), default=1)
    sched = env.get("schedule") or {}
    cut = (f", stopped by the budget after {sched['done']} of {sched['requested']}"
           if sched.get("done") is not None and sched["done"] < sched.get("requested", 0) else "")
    a1.set_title(f"End-to-end epoch time: median of {reps} run(s), whiskers min–max{cut}",
                 fontsize=10)
    a1.grid(axis="x", alpha=0.3)

    # -- loader-only: % of the measured read limit ------------------------------------------
    bw, what = _read_limit(limits, env.get("page_cache") == "cold")
    lo_rows = [(yi, r) for yi, r in zip(y, rows) if r.get("loader_only")]
    top2 = 100.0  # the limit line is always shown
    if bw:
        for yi, r in lo_rows:
            lo = r["loader_only"]
            nbytes = lo["gb_per_s"] * 1e9 * lo["wall_s"]
            runs = lo.get("wall_s_runs") or [lo["wall_s"]]
            pct = 100 * lo["gb_per_s"] * 1e9 / bw
            p_lo, p_hi = (100 * nbytes / max(runs) / bw, 100 * nbytes / min(runs) / bw)
            zero = bool(r.get("config", {}).get("zero_copy_views"))
            a2.barh(yi, min(pct, LO_CAP_PCT), 0.6, color=LIGHT, hatch="//" if zero else None,
                    edgecolor=GREY if zero else "none", gid=f"lo:{r['name']}")
            if not zero and p_hi <= LO_CAP_PCT:
                a2.errorbar(pct, yi, xerr=[[max(0.0, pct - p_lo)], [max(0.0, p_hi - pct)]],
                            fmt="none",
                            ecolor="black", capsize=3, lw=1)
            note = "\n reads nothing:\n zero-copy views" if zero else ""
            at = min(LO_CAP_PCT, pct if zero else max(pct, p_hi))
            note += " ▸ (off the axis)" if pct > LO_CAP_PCT else ""
            if not zero and pct > 100:  # the limit is a measurement too: say so, don't hide it
                note += "\n above the measured limit"
            labels2.append(a2.annotate(f" {pct:.0f} %{note}", (at, yi), va="center",
                                       ha="left", fontsize=8, gid=f"label:{r['name']}"))
            top2 = max(top2, at)
        for yi, r in zip(y, rows):
            if not r.get("loader_only"):
                a2.annotate(" n/a (no loader)", (0, yi), va="center", fontsize=8, color=GREY)
        a2.axvline(100, color=GREEN, ls="--", lw=1.2, gid="read-limit",
                   label=f"100 % = measured read limit, {bw / 1e9:.2f} GB/s ({what})")
    else:
        a2.text(0.5, 0.5, "no read limit measured", ha="center", transform=a2.transAxes)
    a2.set_yticks(y, names, fontsize=9)
    a2.set_ylim(*ylim)
    a2.set_xlabel("loader-only throughput, % of the read limit (longer is better)")
    a2.set_title("Loader alone (no model): share of the read limit"
                 + (f"\n100 % = {bw / 1e9:.2f} GB/s ({what},\nthe faster of preadv and a "
                    f"memmap copy)" if bw else ""), fontsize=9)
    a2.grid(axis="x", alpha=0.3)

    # -- title: device, verdict, command -----------------------------------------------------
    batch = (f"{env['batch_chunks']} chunks (~{env['batch_points']:,} points)"
             if env.get("batch_chunks") else f"{env['batch_points']:,}")
    head = (f"{env['device']} — {env['dataset']['points']:,} points, batch "
            f"{batch}, {env['backbone']} {env['mode']}, {env['page_cache']} cache")
    if quality and quality["verdict"] != "clean":
        verdict = ("INCONCLUSIVE measurement: " + (quality.get("summary")
                                                    or "; ".join(quality["reasons"])))
        color = RED
    else:
        verdict, color = "clean measurement", GREEN
    fig.suptitle(head, fontsize=10, y=0.995)
    fig.text(0.5, 0.955, textwrap.shorten(verdict, 230), ha="center", va="top", fontsize=9,
             color=color, weight="bold", gid="verdict", wrap=True)
    foot = [f"command: {env.get('command', '?')}"]
    foot += [f"{name}: skipped — {why}" for name, why in skipped.items()]
    fig.text(0.01, 0.005, textwrap.shorten(" · ".join(foot), 260), fontsize=7.5, color="#444444",
             gid="command")
    for t in labels1 + labels2:
        t.set_in_layout(False)  # placed by _fit_xlim below, not by squeezing the axes
    fig.tight_layout(rect=(0, 0.03, 1, 0.93))
    _fit_xlim(fig, a1, labels1, top)
    _fit_xlim(fig, a2, labels2, top2)
    return fig


def _fit_xlim(fig: Any, ax: Any, labels: list, data_max: float, pad_px: float = 6.0) -> None:
    """The smallest x range (from 0) that shows ``data_max`` and every label whole: a label
    anchored at data x = a, ``w`` pixels wide, ends inside an axes ``W`` pixels wide when the
    right limit is at least a·W / (W − w − pad)."""
    renderer = fig.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width
    need = max(data_max, 1e-9) * 1.04
    for t in labels:
        w = t.get_window_extent(renderer).width
        room = width - w - pad_px
        a = t.xy[0]
        if room <= 0.25 * width:  # a label wider than three quarters of the axes: pin it
            room = 0.25 * width
        need = max(need, a * width / room)
    ax.set_xlim(0, need)


def plot(path: Path, env: dict, rows: list[dict], limits: dict, quality: dict | None = None,
         skipped: dict[str, str] | None = None) -> None:
    import matplotlib.pyplot as plt

    fig = build_figure(env, rows, limits, quality, skipped or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
