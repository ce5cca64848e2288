"""Gantt charts: time on x (milliseconds), device (rank) on y, one block per piece of work.

Owns the chart of ``loom plan --gantt`` (:func:`write_gantt`) and the drawing that ``loom gantt``'s
predicted-against-measured chart (orchestrator.timeline) shares with it: a PNG drawn with matplotlib
(Agg backend, imported only when a PNG is asked for) and a standalone HTML page with inline SVG built
here (hover titles, no external JS or CSS). Both draw the same :class:`Panel` s of :class:`Block` s,
so they always agree.

The plan's chart: a block is one MetaOp slice on a run of consecutive device ids for the slice's
predicted time (forward + backward) in its wave; colour per task, a shade per MetaOp; the label names
the task and the MetaOp (and its layer count where it fits). Waves run back to back with the transfers
into each wave drawn before it (grey, on the devices that send or receive), and the loss stage,
exposed gradient sync, optimizer and all-gather after the last wave, so that the x extent is the
predicted iteration. Wave labels above the plot are skipped, or drawn vertically, where they would
collide; the title gives the predicted iteration time and the bound.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.render import compact_ranges, format_bytes, format_seconds, short_name, task_order
from orchestrator.trace import loss_hosts, transfer_ranks
from planner.plan import Plan

GANTT_SUFFIXES = (".png", ".html")

# Tableau-like qualitative palette (20 colours), so neighbouring tasks stay distinguishable.
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
# Parts of a step that are not a MetaOp's compute: greys, light to dark, named in the legend.
KIND_FILLS = {"transfer": "#c7c7c7", "loss": "#8f8f8f", "sync": "#5e5e5e", "optimizer": "#2f2f2f"}
CHAR_WIDTH_EM = 0.6  # average glyph width of a sans-serif font, in font sizes


@dataclass(frozen=True)
class Block:
    """One rectangle: MetaOp ``metaop`` (of ``task``) in wave ``wave`` on devices
    ``first_device .. first_device + num_devices - 1``, from ``start_s`` for ``duration_s`` seconds.
    ``kind`` is ``compute`` or another part of a step (a key of :data:`KIND_FILLS`; then ``metaop`` is -1)."""

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
    kind: str = "compute"


@dataclass(frozen=True)
class Panel:
    """One chart: its blocks on ``num_devices`` rows over ``[0, end_s]``, with wave labels (``marks``: centre in
    seconds and text) and vertical guides at ``boundaries`` (seconds)."""

    heading: str
    blocks: list[Block]
    num_devices: int
    devices_per_node: int
    end_s: float
    marks: list[tuple[float, str]] = field(default_factory=list)
    boundaries: list[float] = field(default_factory=list)
    row_name: str = "device"


def gantt_blocks(plan: Plan) -> list[Block]:
    """The plan chart's blocks: every (slice, run of consecutive device ids), in wave then device order,
    then the transfers, loss stage, sync and optimizer (kinds of :data:`KIND_FILLS`)."""
    starts, _ = _plan_timeline(plan)
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
            for first, count in device_runs(s.devices):
                blocks.append(Block(
                    wave=wave.index, metaop=s.metaop, task=op.task,
                    label=f"{op.task}: {name} \u00d7{s.num_layers}", short_label=op.task, tooltip=tooltip,
                    start_s=starts[wave.index], duration_s=duration, first_device=first, num_devices=count,
                ))
    return sorted(blocks, key=lambda b: (b.wave, b.first_device)) + _part_blocks(plan)


def _plan_timeline(plan: Plan) -> tuple[list[float], float]:
    """Where each wave starts on the plan chart (after the transfers into it, and into every earlier wave), and
    where the last wave ends."""
    starts, shift = [], 0.0
    for wave in plan.waves:
        shift += wave.transfer_in_s + wave.transfer_back_s
        starts.append(wave.start_s + shift)
    return starts, (starts[-1] + plan.waves[-1].duration_s if plan.waves else 0.0)


def _part_blocks(plan: Plan) -> list[Block]:
    """Transfers before each wave (on the devices that move data), then loss, sync, optimizer and all-gather."""
    starts, t = _plan_timeline(plan)
    num_devices = plan.cluster.num_nodes * plan.cluster.devices_per_node
    blocks = []

    def add(kind: str, label: str, short: str, tip: str, start: float, seconds: float, devices, wave: int = -1):
        for first, count in device_runs(list(devices)):
            blocks.append(Block(wave, -1, "", label, short, f"{tip}: {format_seconds(seconds)}", start, seconds,
                                first, count, kind))

    movers = transfer_ranks(plan)
    for k, wave in enumerate(plan.waves):
        seconds = wave.transfer_in_s + wave.transfer_back_s
        if seconds > 0:
            add("transfer", "transfer", "T", f"transfers into wave {k} (activations in, gradients back)",
                starts[k] - seconds, seconds, movers.get(k, ()), k)
    pred = plan.predicted
    parts = [("transfer", "transfer", "T", "transfers to the loss stage and back",
              pred.loss_transfer_in_s + pred.loss_transfer_back_s, movers.get(-1, ())),
             ("loss", "loss", "L", "loss stage (busiest device)", pred.loss_s, loss_hosts(plan)),
             ("sync", "sync", "S", "exposed gradient sync", pred.sync_s, range(num_devices)),
             ("optimizer", "optimizer", "O", "optimizer step (slowest device)", pred.optimizer_s, range(num_devices)),
             ("sync", "all-gather", "G", "exposed parameter all-gather", pred.gather_s, range(num_devices))]
    for kind, label, short, tip, seconds, devices in parts:
        if seconds > 0:
            add(kind, label, short, tip, t, seconds, devices)
            t += seconds
    return blocks


def device_runs(devices: list[int]) -> list[tuple[int, int]]:
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


def block_fill(block: Block, fills: Sequence[str]) -> str:
    """The fill of ``block``: its MetaOp's shade (``fills`` by MetaOp id) or its kind's grey."""
    return fills[block.metaop] if block.kind == "compute" else KIND_FILLS[block.kind]


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
    """End of the plan chart's last block in seconds (its x extent)."""
    return max((b.start_s + b.duration_s for b in gantt_blocks(plan)), default=0.0)


def plan_panel(plan: Plan) -> Panel:
    """The chart of ``loom plan --gantt`` as one panel."""
    starts, _ = _plan_timeline(plan)
    marks = [(starts[w.index] + w.duration_s / 2, f"w{w.index}") for w in plan.waves]
    return Panel("", gantt_blocks(plan), plan.cluster.num_nodes * plan.cluster.devices_per_node,
                 plan.cluster.devices_per_node, makespan(plan), marks, [starts[w.index] for w in plan.waves[1:]])


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


def wave_labels(marks: Sequence[tuple[float, str]], px_per_s: float, font_px: float
                ) -> tuple[list[float], list[str], bool]:
    """Centres (s) and texts of the wave labels drawn at ``px_per_s``, and whether they are vertical.

    Horizontal when at least half of them fit side by side; otherwise vertical (a label then needs only
    the font's height). Either way a label that would overlap the previous one drawn is skipped."""
    def fit(width_of) -> tuple[list[float], list[str]]:
        centres, labels, last_right = [], [], -math.inf
        for centre, text in marks:
            half = width_of(text) / 2 + 2
            if centre * px_per_s - half >= last_right:
                centres.append(centre)
                labels.append(text)
                last_right = centre * px_per_s + half
        return centres, labels

    centres, labels = fit(lambda text: len(text) * font_px * CHAR_WIDTH_EM)
    if 2 * len(labels) >= len(marks):
        return centres, labels, False
    return (*fit(lambda text: font_px * 1.2), True)


def write_gantt(plan: Plan, path: str | Path) -> None:
    """Write the plan's chart to ``path``: PNG for ``.png``, standalone HTML for ``.html``."""
    title, subtitle = chart_title(plan)
    write_panels([plan_panel(plan)], metaop_colours(plan), task_colours(plan), title, subtitle, path,
                 page_title=f"{plan.job}: Loom plan")


def write_panels(panels: Sequence[Panel], fills: Sequence[str], legend: Mapping[str, str], title: str,
                 subtitle: str, path: str | Path, page_title: str) -> None:
    """Write ``panels`` stacked top to bottom: PNG for ``.png``, standalone HTML for ``.html``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        write_png(panels, fills, legend, f"{title}\n{subtitle}", path)
    elif suffix == ".html":
        path.write_text(render_html(panels, fills, legend, title, subtitle, page_title), encoding="utf-8")
    else:
        raise ValueError(f"{path}: unsupported chart format {suffix!r}; use one of {', '.join(GANTT_SUFFIXES)}")


def legend_entries(legend: Mapping[str, str], panels: Sequence[Panel]) -> dict[str, str]:
    """Task colours, then the step parts that some panel draws."""
    kinds = {b.kind for p in panels for b in p.blocks} - {"compute"}
    return {**legend, **{kind: fill for kind, fill in KIND_FILLS.items() if kind in kinds}}


def ms_label(seconds: float) -> str:
    """A time-axis tick: milliseconds, without trailing zeros."""
    return f"{seconds * 1e3:.6g}"


# --------------------------------------------------------------------------- PNG (matplotlib)


def write_png(panels: Sequence[Panel], fills: Sequence[str], legend: Mapping[str, str], title: str, path: Path,
              dpi: int = 120) -> None:
    """Draw the panels with matplotlib's Agg canvas (no pyplot, no global backend) and save them as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    heights = [min(max(2.0 + 0.14 * p.num_devices, 3.5), 12.0) for p in panels]
    fig = Figure(figsize=(14, sum(heights) + 0.6 * (len(panels) - 1)), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, panel in zip(axes, panels):
        _draw_png_blocks(ax, panel, fills)
    if panels[0].heading:  # the chart's title above the panels' own
        fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    else:
        axes[0].set_title(title, fontsize=9, loc="left")
    handles = [Patch(facecolor=c, label=t) for t, c in legend_entries(legend, panels).items()]
    axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, title="task / part",
                   title_fontsize=8, frameon=False)
    canvas.draw()  # lay out first, so label fitting uses the axes' real size in pixels
    for ax, panel in zip(axes, panels):
        _label_png_blocks(ax, panel, fills, dpi)
    fig.savefig(path, format="png")


def _draw_png_blocks(ax, panel: Panel, fills: Sequence[str]) -> None:
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FuncFormatter

    end = panel.end_s or 1.0
    ax.set_xlim(0, end)
    ax.set_ylim(panel.num_devices, 0)  # device 0 on top
    for block in panel.blocks:
        ax.add_patch(Rectangle((block.start_s, block.first_device), block.duration_s, block.num_devices,
                               facecolor=block_fill(block, fills), edgecolor="white", linewidth=0.8))
    for x in panel.boundaries:
        ax.axvline(x, color="#333333", linewidth=0.5, alpha=0.6, zorder=3)
    per_node = panel.devices_per_node
    for node in range(1, math.ceil(panel.num_devices / per_node)):
        ax.axhline(node * per_node, color="#000000", linewidth=0.8, linestyle="--", alpha=0.35, zorder=3)
    n = panel.num_devices
    step = 1 if n <= 16 else per_node if n <= 8 * per_node else max(per_node, n // 16)
    ticks = list(range(0, n, step))
    ax.set_yticks([t + 0.5 for t in ticks], [str(t) for t in ticks], fontsize=8)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: ms_label(value)))
    ax.set_xlabel("time (ms)")
    ax.set_ylabel(panel.row_name)
    if panel.heading:
        ax.set_title(panel.heading, fontsize=9, loc="left", fontweight="bold")


def _label_png_blocks(ax, panel: Panel, fills: Sequence[str], dpi: int) -> None:
    """Block labels where they fit, and the wave labels above the panel."""
    extent = ax.get_window_extent()
    px_per_s, px_per_device = extent.width / (panel.end_s or 1.0), extent.height / panel.num_devices
    font_pt = 7
    font_px = font_pt * dpi / 72
    for block in panel.blocks:
        fit = fitting_label(block, block.duration_s * px_per_s, block.num_devices * px_per_device, font_px)
        if fit:
            ax.text(block.start_s + block.duration_s / 2, block.first_device + block.num_devices / 2, fit[0],
                    ha="center", va="center", fontsize=font_pt, color=_text_colour(block_fill(block, fills)),
                    rotation=90 if fit[1] else 0, clip_on=True, zorder=4)
    centres, labels, vertical = wave_labels(panel.marks, px_per_s, font_px)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels, fontsize=7, rotation=90 if vertical else 0)
    top.tick_params(length=0)


# --------------------------------------------------------------------------- HTML (inline SVG)

SVG_WIDTH = 1200
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 40, 40


def nice_ticks(end: float, target: int = 10) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten) from 0 to ``end``."""
    if end <= 0:
        return [0.0]
    raw = end / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    count = int(end / step + 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def render_html(panels: Sequence[Panel], fills: Sequence[str], legend: Mapping[str, str], title: str,
                subtitle: str, page_title: str) -> str:
    """A standalone HTML page holding each panel as inline SVG with a hover title per block."""
    keys = "".join(
        f'<span class="key"><span class="swatch" style="background:{c}"></span>{html.escape(t)}</span>'
        for t, c in legend_entries(legend, panels).items()
    )
    body = "\n".join((f"<h2>{html.escape(p.heading)}</h2>\n" if p.heading else "") + render_svg(p, fills)
                     for p in panels)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(page_title)}</title>\n<style>\n"
        "body{font-family:sans-serif;margin:16px;color:#222}h1{font-size:16px;margin:0 0 4px}"
        "h2{font-size:14px;margin:12px 0 0}"
        "p{font-size:13px;margin:0 0 8px;color:#555}.key{margin-right:14px;font-size:13px;white-space:nowrap}"
        ".swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}"
        "svg text{font-family:sans-serif}rect.slice:hover{stroke:#000;stroke-width:1.5}\n"
        "</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(subtitle)}; hover a block for details.</p>\n"
        f"<div>{keys}</div>\n{body}\n</body>\n</html>\n"
    )


def render_svg(panel: Panel, fills: Sequence[str]) -> str:
    """One panel as an SVG element (device rows, time axis in ms, blocks, wave and node boundaries)."""
    num_devices = panel.num_devices
    end = panel.end_s or 1.0
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
    font = 11.0
    for b in panel.blocks:
        fill = block_fill(b, fills)
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
    out.extend(_svg_guides(panel, x, y, row, plot_h, end))
    out.append("</svg>")
    return "\n".join(out)


def _svg_guides(panel: Panel, x, y, row: float, plot_h: float, end: float) -> list[str]:
    """Wave and node boundaries, the time axis with ticks (ms), device labels and wave labels."""
    out = []
    bottom = MARGIN_TOP + plot_h
    for start in panel.boundaries:
        out.append(f'<line x1="{x(start):.2f}" y1="{MARGIN_TOP}" x2="{x(start):.2f}" '
                   f'y2="{bottom:.2f}" stroke="#333" stroke-width="0.6" stroke-opacity="0.6"/>')
    per_node = panel.devices_per_node
    for node in range(1, math.ceil(panel.num_devices / per_node)):
        out.append(f'<line x1="{MARGIN_LEFT}" y1="{y(node * per_node):.2f}" x2="{x(end):.2f}" '
                   f'y2="{y(node * per_node):.2f}" stroke="#000" stroke-dasharray="4 3" stroke-opacity="0.5"/>')
    for t in nice_ticks(end * 1e3):
        tx = x(t / 1e3)
        out.append(f'<line x1="{tx:.2f}" y1="{bottom:.2f}" x2="{tx:.2f}" y2="{bottom + 4:.2f}" stroke="#222"/>')
        out.append(f'<text x="{tx:.2f}" y="{bottom + 16:.2f}" font-size="11" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{x(end / 2):.2f}" y="{bottom + 32:.2f}" font-size="12" text-anchor="middle">'
               "time (ms)</text>")
    step = 1 if row >= 14 else per_node if per_node * row >= 14 else math.ceil(14 / row)
    for d in range(0, panel.num_devices, step):
        out.append(f'<text x="{MARGIN_LEFT - 6}" y="{y(d + 0.5):.2f}" font-size="10" text-anchor="end" '
                   f'dominant-baseline="central">{d}</text>')
    out.append(f'<text x="14" y="{MARGIN_TOP + plot_h / 2:.2f}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {MARGIN_TOP + plot_h / 2:.2f})">{html.escape(panel.row_name)}</text>')
    centres, labels, vertical = wave_labels(panel.marks, (x(end) - x(0)) / end, 10.0)
    for centre, text in zip(centres, labels):
        cx, cy = x(centre), MARGIN_TOP - 6
        turn = f' transform="rotate(-90 {cx:.2f} {cy})" dominant-baseline="central"' if vertical else ""
        anchor = "start" if vertical else "middle"
        out.append(f'<text x="{cx:.2f}" y="{cy}" font-size="10" text-anchor="{anchor}" fill="#555"{turn}>'
                   f"{html.escape(text)}</text>")
    return out
