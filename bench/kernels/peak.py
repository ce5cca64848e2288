"""What a CUDA run holds at its peak: the allocations live when the CUDA caching allocator's allocated bytes were
highest, grouped by the line of Loom's code (or torch's) that made them.

``python -m bench.kernels --device cuda`` records this for each side of each case in one extra, untimed run
(``torch.cuda.memory._record_memory_history`` with Python stacks), so that a kernel whose peak is above the naive
expression's says which tensor makes the difference. :func:`live_at_peak` only reads the allocator's trace events
(``alloc`` / ``free_requested``, as ``torch.cuda.memory._snapshot()["device_traces"]`` lists them), so it is tested on
CPU with a written trace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

TOP = 8  # groups kept per side


def where(frames: list[dict], root: Path) -> str:
    """``path:line function`` of the innermost frame in ``root`` (Loom's code) outside bench/ (the kernels), else in
    bench/ (a naive expression's line), else the innermost frame's file, else the autograd engine's thread (a C++
    backward has no Python frame)."""
    ours = [(Path(f.get("filename", "")), f) for f in frames]
    ours = [(path.relative_to(root), f) for path, f in ours if path.is_relative_to(root) and path.name != "peak.py"]
    for rel, frame in sorted(ours, key=lambda item: item[0].parts[0] == "bench"):  # stable: innermost first
        return f"{rel}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{Path(frames[0].get('filename', '?')).name}:{frames[0].get('line')} {frames[0].get('name')}"
    return "no Python frame (the autograd engine's backward)"


def live_at_peak(events: list[dict], root: Path) -> dict:
    """``{"bytes": peak, "parts": [{"where", "bytes", "count"}, ...]}``: the allocations made during the trace that
    were live when their total was highest (allocations from before it are not counted), largest groups first."""
    live: dict[int, tuple[int, str]] = {}
    total = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], where(event.get("frames", []), root))
            total += event["size"]
            if total > best:
                best, best_live = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    groups: dict[str, list[int]] = {}
    for size, place in best_live.values():
        groups.setdefault(place, []).append(size)
    parts = [{"where": place, "bytes": sum(sizes), "count": len(sizes)} for place, sizes in groups.items()]
    parts.sort(key=lambda p: -p["bytes"])
    return {"bytes": best, "parts": parts[:TOP]}


def traced_peak(run: Callable[[], object], root: Path) -> dict:
    """:func:`live_at_peak` of one call of ``run`` on the current CUDA device; ``{"error": ...}`` if the allocator's
    history cannot be recorded (the timed figures stand without it)."""
    try:
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
        try:
            result = run()
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        del result
        traces = snapshot.get("device_traces", [])
        events = traces[torch.cuda.current_device()] if traces else []
        return live_at_peak(events, root)
    except Exception as error:  # noqa: BLE001 - a diagnostic; its failure must not cost the case
        return {"error": f"{type(error).__name__}: {error}"}
