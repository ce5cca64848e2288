"""Gantt charts of a Plan: time on x, device id on y, one block per slice and contiguous device range.

Owns the chart of ``loom plan --gantt``: a PNG drawn with matplotlib (Agg backend, imported only
when a PNG is asked for) and a standalone HTML page with an inline SVG built here (hover titles,
no external JS or CSS). Both draw the same :class:`Block` list, so they always agree: a block is
one MetaOp slice on a run of consecutive device ids for the slice's predicted time from its
wave's start; colour is per task; the label (MetaOp short name and layer count) is drawn only
where it fits; thin lines mark wave boundaries; the title gives the predicted iteration time and
the bound.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

from planner.plan import Plan
from orchestrator.render import compact_ranges, format_bytes, format_seconds, short_name, task_order

GANTT_SUFFIXES = (".png", ".html")

# Tableau-like qualitative palette (20 colours), so neighbouring tasks stay distinguishable.
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
CHAR_WIDTH_EM = 0.6  # average glyph width of a sans-serif font, in font sizes


@dataclass(frozen=True)
class Block:
    """One rectangle: MetaOp ``metaop`` (of ``task``) in wave ``wave`` on devices
    ``first_device .. first_device + num_devices - 1``, from ``start_s`` for ``duration_s`` seconds."""

    wave: int
    metaop: int
    task: str
    label: str
    short_label: str
    tooltip: str
    start_s: float
    duration_s: float
    first_device: int
    num_devices: int


def gantt_blocks(plan: Plan) -> list[Block]:
    """The chart's blocks: every (slice, run of consecutive device ids), in wave then device order."""
    blocks = []
    for wave in plan.waves:
        for s in wave.slices:
            op = plan.metaops[s.metaop]
            name = short_name(op)
            last = s.first_layer + s.num_layers - 1
            tooltip = (
                f"{op.name} (task {op.task}), wave {wave.index}\n"
                f"layers {s.first_layer}..{last} ({s.num_layers} of {op.num_layers})\n"
                f"devices {compact_ranges(s.devices)} (dp {s.dp_degree} x tp {s.tp_degree})\n"
                f"time {format_seconds(s.time_s)} of wave {format_seconds(wave.duration_s)}, "
                f"memory {format_bytes(s.memory_bytes)}/device"
            )
            # A slice shorter than its wave leaves its devices idle until the wave ends.
            duration = min(s.time_s, wave.duration_s) if wave.duration_s > 0 else s.time_s
            for first, count in _runs(s.devices):
                blocks.append(Block(
                    wave=wave.index, metaop=s.metaop, task=op.task, label=f"{name} \u00d7{s.num_layers}",
                    short_label=name, tooltip=tooltip, start_s=wave.start_s, duration_s=duration,
                    first_device=first, num_devices=count,
                ))
    return sorted(blocks, key=lambda b: (b.wave, b.first_device))


def _runs(devices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted device ids as (first, count)."""
    runs: list[tuple[int, int]] = []
    for d in sorted(set(devices)):
        if runs and runs[-1][0] + runs[-1][1] == d:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((d, 1))
    return runs


def task_colours(plan: Plan) -> dict[str, str]:
    """A colour per task, in the order tasks first appear in the plan's MetaOps."""
    return {task: PALETTE[i % len(PALETTE)] for i, task in enumerate(task_order(plan.metaops))}


SHADES = (0.0, 0.22, -0.18, 0.38, -0.32)  # >0 mixes towards white, <0 towards black


def metaop_colours(plan: Plan) -> list[str]:
    """A fill per MetaOp id: its task's colour, shaded differently for each MetaOp of the task, so that
    neighbouring blocks of one task stay apart while the hue still says which task they belong to."""
    base = task_colours(plan)
    seen: dict[str, int] = {}
    fills = []
    for op in plan.metaops:
        j = seen.get(op.task, 0)
        seen[op.task] = j + 1
        fills.append(shade(base[op.task], SHADES[j % len(SHADES)]))
    return fills


def shade(colour: str, amount: float) -> str:
    """``colour`` (#rrggbb) mixed with white (amount > 0) or black (amount < 0) by ``|amount|``."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    target = 255 if amount > 0 else 0
    mixed = [round(c + (target - c) * abs(amount)) for c in rgb]
    return "#" + "".join(f"{c:02x}" for c in mixed)


def chart_title(plan: Plan) -> tuple[str, str]:
    """Title and subtitle: predicted iteration time and bound; devices, waves and solver status."""
    pred, bound = plan.predicted, plan.bounds.per_level_s
    ratio = f", compute/bound {pred.compute_s / bound:.3f}x" if bound > 0 else ""
    cluster = plan.cluster
    num_devices = cluster.num_nodes * cluster.devices_per_node
    title = (
        f"{plan.job}: predicted iteration {format_seconds(pred.iteration_time_s)} "
        f"(compute {format_seconds(pred.compute_s)}); bound {format_seconds(bound)}{ratio}"
    )
    subtitle = (
        f"{num_devices} x {cluster.device} ({cluster.num_nodes} x {cluster.devices_per_node}), "
        f"{len(plan.waves)} waves, {len(plan.metaops)} MetaOps, cost model {plan.cost_model}, "
        f"solver {plan.solver.status}"
    )
    return title, subtitle


def makespan(plan: Plan) -> float:
    """End of the last wave in seconds (the chart's x extent)."""
    return max((w.start_s + w.duration_s for w in plan.waves), default=0.0)


def _text_colour(fill: str) -> str:
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


def fitting_label(block: Block, width_px: float, height_px: float, font_px: float) -> tuple[str, bool] | None:
    """The longest of the block's labels that fits in a ``width_px`` x ``height_px`` box, and whether it
    must be drawn vertically (tall, narrow blocks, common with many waves); None when nothing fits."""
    for text in (block.label, block.short_label):
        length = len(text) * font_px * CHAR_WIDTH_EM + 4
        if height_px >= font_px * 1.1 and length <= width_px:
            return text, False
        if width_px >= font_px * 1.1 and length <= height_px:
            return text, True
    return None


def write_gantt(plan: Plan, path: str | Path) -> None:
    """Write the chart to ``path``: PNG for ``.png``, standalone HTML for ``.html``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        write_png(plan, path)
    elif suffix == ".html":
        path.write_text(render_html(plan), encoding="utf-8")
    else:
        raise ValueError(f"{path}: unsupported chart format {suffix!r}; use one of {', '.join(GANTT_SUFFIXES)}")


# --------------------------------------------------------------------------- PNG (matplotlib)


def write_png(plan: Plan, path: Path, dpi: int = 120) -> None:
    """Draw the chart with matplotlib's Agg canvas (no pyplot, no global backend) and save it as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    cluster = plan.cluster
    num_devices = cluster.num_nodes * cluster.devices_per_node
    colours, fills = task_colours(plan), metaop_colours(plan)
    end = makespan(plan) or 1.0
    height = min(max(2.0 + 0.14 * num_devices, 3.5), 12.0)
    fig = Figure(figsize=(14, height), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(0, end)
    ax.set_ylim(num_devices, 0)  # device 0 on top
    blocks = gantt_blocks(plan)
    for block in blocks:
        ax.add_patch(Rectangle(
            (block.start_s, block.first_device), block.duration_s, block.num_devices,
            facecolor=fills[block.metaop], edgecolor="white", linewidth=0.8,
        ))
    _draw_png_guides(ax, plan, num_devices)
    title, subtitle = chart_title(plan)
    ax.set_title(f"{title}\n{subtitle}", fontsize=9, loc="left")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("device")
    handles = [Patch(facecolor=colours[t], label=t) for t in colours]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, title="task",
              title_fontsize=8, frameon=False)
    canvas.draw()  # lay out first, so label fitting uses the axes' real size in pixels
    extent = ax.get_window_extent()
    px_per_s, px_per_device = extent.width / end, extent.height / num_devices
    font_pt = 7
    font_px = font_pt * dpi / 72
    for block in blocks:
        fit = fitting_label(block, block.duration_s * px_per_s, block.num_devices * px_per_device, font_px)
        if fit:
            ax.text(block.start_s + block.duration_s / 2, block.first_device + block.num_devices / 2, fit[0],
                    ha="center", va="center", fontsize=font_pt, color=_text_colour(fills[block.metaop]),
                    rotation=90 if fit[1] else 0, clip_on=True, zorder=4)
    _label_png_waves(ax, plan, px_per_s, font_px)
    fig.savefig(path, format="png")


def _draw_png_guides(ax, plan: Plan, num_devices: int) -> None:
    """Wave boundaries (vertical), node boundaries (horizontal) and device ticks."""
    for wave in plan.waves[1:]:
        ax.axvline(wave.start_s, color="#333333", linewidth=0.5, alpha=0.6, zorder=3)
    per_node = plan.cluster.devices_per_node
    for node in range(1, plan.cluster.num_nodes):
        ax.axhline(node * per_node, color="#000000", linewidth=0.8, linestyle="--", alpha=0.35, zorder=3)
    step = 1 if num_devices <= 16 else per_node if num_devices <= 8 * per_node else max(per_node, num_devices // 16)
    ticks = list(range(0, num_devices, step))
    ax.set_yticks([t + 0.5 for t in ticks], [str(t) for t in ticks], fontsize=8)


def _label_png_waves(ax, plan: Plan, px_per_s: float, font_px: float) -> None:
    """Wave numbers above the plot, skipping those that would overlap the previous label."""
    centres, labels = wave_labels(plan, px_per_s, font_px)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels, fontsize=7)
    top.tick_params(length=0)


def wave_labels(plan: Plan, px_per_s: float, font_px: float) -> tuple[list[float], list[str]]:
    """Centres (s) and texts (``w<k>``) of the wave labels that fit side by side at ``px_per_s``."""
    centres, labels = [], []
    last_right = -math.inf
    for wave in plan.waves:
        text = f"w{wave.index}"
        centre = wave.start_s + wave.duration_s / 2
        half = len(text) * font_px * CHAR_WIDTH_EM / 2 + 2
        if centre * px_per_s - half >= last_right:
            centres.append(centre)
            labels.append(text)
            last_right = centre * px_per_s + half
    return centres, labels


# --------------------------------------------------------------------------- HTML (inline SVG)

SVG_WIDTH = 1200
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 28, 40


def nice_ticks(end: float, target: int = 10) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten) from 0 to ``end``."""
    if end <= 0:
        return [0.0]
    raw = end / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    count = int(end / step + 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def render_html(plan: Plan) -> str:
    """A standalone HTML page holding the chart as inline SVG with a hover title per block."""
    title, subtitle = chart_title(plan)
    colours = task_colours(plan)
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{c}"></span>{html.escape(t)}</span>'
        for t, c in colours.items()
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(plan.job)}: Loom plan</title>\n<style>\n"
        "body{font-family:sans-serif;margin:16px;color:#222}h1{font-size:16px;margin:0 0 4px}"
        "p{font-size:13px;margin:0 0 8px;color:#555}.key{margin-right:14px;font-size:13px;white-space:nowrap}"
        ".swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}"
        "svg text{font-family:sans-serif}rect.slice:hover{stroke:#000;stroke-width:1.5}\n"
        "</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(subtitle)}; hover a block for details.</p>\n"
        f"<div>{legend}</div>\n{render_svg(plan)}\n</body>\n</html>\n"
    )


def render_svg(plan: Plan) -> str:
    """The chart as an SVG element (device rows, time axis, blocks, wave and node boundaries)."""
    cluster = plan.cluster
    num_devices = cluster.num_nodes * cluster.devices_per_node
    end = makespan(plan) or 1.0
    row = max(4.0, min(24.0, 640.0 / num_devices))
    plot_w = SVG_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = row * num_devices
    height = MARGIN_TOP + plot_h + MARGIN_BOTTOM

    def x(seconds: float) -> float:
        return MARGIN_LEFT + seconds / end * plot_w

    def y(device: float) -> float:
        return MARGIN_TOP + device * row

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_WIDTH}" height="{height:.0f}" '
           f'viewBox="0 0 {SVG_WIDTH} {height:.0f}" role="img">',
           f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h:.1f}" fill="#f7f7f7"/>']
    fills = metaop_colours(plan)
    font = 11.0
    for b in gantt_blocks(plan):
        fill = fills[b.metaop]
        bx, by, bw, bh = x(b.start_s), y(b.first_device), b.duration_s / end * plot_w, b.num_devices * row
        out.append(
            f'<rect class="slice" x="{bx:.2f}" y="{by:.2f}" width="{bw:.2f}" height="{bh:.2f}" fill="{fill}" '
            f'stroke="#ffffff" stroke-width="0.5"><title>{html.escape(b.tooltip)}</title></rect>'
        )
        fit = fitting_label(b, bw, bh, font)
        if fit:
            cx, cy = bx + bw / 2, by + bh / 2
            rotate = f' transform="rotate(-90 {cx:.2f} {cy:.2f})"' if fit[1] else ""
            out.append(
                f'<text x="{cx:.2f}" y="{cy:.2f}" font-size="{font:g}" text-anchor="middle" '
                f'dominant-baseline="central" fill="{_text_colour(fill)}" pointer-events="none"{rotate}>'
                f"{html.escape(fit[0])}</text>"
            )
    out.extend(_svg_guides(plan, x, y, row, plot_h, end, num_devices))
    out.append("</svg>")
    return "\n".join(out)


def _svg_guides(plan: Plan, x, y, row: float, plot_h: float, end: float, num_devices: int) -> list[str]:
    """Wave and node boundaries, the time axis with ticks, device labels and wave labels."""
    out = []
    bottom = MARGIN_TOP + plot_h
    for wave in plan.waves[1:]:
        out.append(f'<line x1="{x(wave.start_s):.2f}" y1="{MARGIN_TOP}" x2="{x(wave.start_s):.2f}" '
                   f'y2="{bottom:.2f}" stroke="#333" stroke-width="0.6" stroke-opacity="0.6"/>')
    per_node = plan.cluster.devices_per_node
    for node in range(1, plan.cluster.num_nodes):
        out.append(f'<line x1="{MARGIN_LEFT}" y1="{y(node * per_node):.2f}" x2="{x(end):.2f}" '
                   f'y2="{y(node * per_node):.2f}" stroke="#000" stroke-dasharray="4 3" stroke-opacity="0.5"/>')
    for t in nice_ticks(end):
        out.append(f'<line x1="{x(t):.2f}" y1="{bottom:.2f}" x2="{x(t):.2f}" y2="{bottom + 4:.2f}" stroke="#222"/>')
        out.append(f'<text x="{x(t):.2f}" y="{bottom + 16:.2f}" font-size="11" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{x(end / 2):.2f}" y="{bottom + 32:.2f}" font-size="12" text-anchor="middle">time (s)</text>')
    step = 1 if row >= 14 else per_node if per_node * row >= 14 else math.ceil(14 / row)
    for d in range(0, num_devices, step):
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{y(d + 0.5):.2f}" font-size="10" text-anchor="end" '
                   f'dominant-baseline="central">{d}</text>')
    out.append(f'<text x="14" y="{MARGIN_TOP + plot_h / 2:.2f}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {MARGIN_TOP + plot_h / 2:.2f})">device</text>')
    for centre, text in zip(*wave_labels(plan, (x(end) - x(0)) / end, 10.0)):
        out.append(f'<text x="{x(centre):.2f}" y="{MARGIN_TOP - 8}" font-size="10" text-anchor="middle" '
                   f'fill="#555">{text}</text>')
    return out
