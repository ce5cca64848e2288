"""Reading a profiled cost file (``loom profile``'s output, ``loom plan/run --costs``) and checking that it makes
sense before any of it is fitted: one SpecError line naming the file, the entry, its value, what is wrong and the fix.

The format (planner.costmodel.ProfiledCostModel): a JSON object with ``points`` (profile key -> curve) and the
optional ``version`` (1), ``device``, ``embed``, ``head`` and ``data`` (name -> curve), ``optimizer_s_per_param``, ``optimizer``
(the fitted step ``{"step_s": a, "s_per_param": b, "s_per_tensor": c}``, b > 0, a and c >= 0), ``modules`` (module name -> ``[parameters,
tensors]`` or ``[parameters, tensors, matrix parameters]``: what the runtime builds, for the planner's buckets, the
optimizer's per-tensor term and the hand-off of a copy only to decode with, whose matrices cross in the compute
precision) and ``links``
(``p2p``/``allreduce``/``allgather`` -> curve) and ``forward`` (profile key -> ``[[local_batch, share], ...]``: the
share of a layer's time its forward took, each in (0, 1]; no monotone rule) and ``calibration`` (part -> ratio:
``compute``, ``loss``, ``optimizer``, each in :data:`CALIBRATION_BOUNDS`: what the runtime measured over what the
profile predicted, orchestrator.calibrate). A curve is a non-empty list of ``[x, seconds]`` pairs: x a local batch
(a whole number, 1..2^24; links: bytes in (0, 2^50]), seconds in (0, 86400], no x twice, and **monotone**: more
samples (or bytes) never take less time, beyond measurement noise. Precisely: sorted by x, a point is refused when
its time is below ``1 - MONOTONE_TOLERANCE`` (half) of the largest time at a smaller x *and* more than
``MONOTONE_NOISE_S`` (5 ms) below it. Smaller dips are the noise of a busy host (seen on 2 cores under load 12: an
embedding at 1.85 ms for 8 samples, 0.69 ms for 16; `loom profile` now writes rising curves,
runtime.profiler.rising_curves); a larger fall is a broken or edited measurement, which the piecewise-linear fit would extrapolate towards zero (the fit's floor) for larger
batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from planner.devices import DEVICES
from planner.errors import SpecError, did_you_mean
from planner.jsonfile import JsonKind, read_json

COST_FILE_VERSION = 1  # runtime.profiler.PROFILE_VERSION writes it (a test checks they agree)
MONOTONE_TOLERANCE = 0.5  # a time may fall this fraction below one at a smaller x (noise) ...
MONOTONE_NOISE_S = 0.005  # ... or this many seconds, whichever is more; no further
MAX_COST_FILE_BYTES = 64 * 2**20  # a profile of thousands of workloads is a few MiB
# Magnitudes no measurement has: beyond them a finite number still overflows to inf once the simulator multiplies it
# (1e300 s per parameter times a billion parameters). A point takes at most a day; a local batch at most 2^24
# samples; a message at most 2^50 bytes; AdamW at most a millisecond per parameter.
MAX_SECONDS = 86_400.0
MAX_BATCH = 2**24
MAX_BYTES = 2.0**50
MAX_SECONDS_PER_PARAM = 1e-3
MAX_SECONDS_PER_TENSOR = 1.0  # an optimizer's work per tensor (kernel launches): far below a second
MAX_PARAMS = 2.0**50  # a module's parameters
MAX_TENSORS = 2**24  # a module's parameter tensors
OPTIMIZER_TERMS = ("step_s", "s_per_param", "s_per_tensor")
KEYS = ("version", "device", "points", "embed", "head", "data", "optimizer_s_per_param", "optimizer", "modules",
        "links", "forward", "calibration")
CALIBRATION_PARTS = ("compute", "loss", "optimizer")
CALIBRATION_BOUNDS = (0.1, 10.0)  # a run at a tenth or ten times its profile (4 workers on 2 cores: 4-8x): went wrong
LINK_KINDS = ("p2p", "allreduce", "allgather")
FIX = "Re-run `loom profile JOB.yaml --output COSTS.json`"
SHAPE = "not a profiled cost file"  # the start of every message about the file's structure (not its numbers)
COST_FILE = JsonKind("cost file", SHAPE, "the JSON `loom profile` writes: a 'points' mapping of [[local_batch, "
                     "seconds], ...] lists", FIX, MAX_COST_FILE_BYTES)

Points = list[tuple[float, float]]


@dataclass(frozen=True)
class CostFile:
    """A checked cost file: every curve sorted by x, as floats."""

    points: dict[str, Points]
    embed: dict[str, Points]
    head: dict[str, Points]
    optimizer_s_per_param: float | None
    links: dict[str, Points]
    optimizer: tuple[float, float, float] | None = None  # (step_s, s_per_param, s_per_tensor): the fitted step
    # module name -> (parameters, tensors) or (parameters, tensors, matrix parameters) as the runtime builds it
    modules: dict[str, tuple[float, ...]] | None = None
    data: dict[str, Points] | None = None  # task -> drawing its rows of the batch (absent in files before it)
    device: str = ""  # the device kind it was profiled on (planner.devices.DEVICES); "" when the file names none
    forward: dict[str, Points] | None = None  # profile key -> the forward's share of a layer's time, per local batch
    calibration: dict[str, float] | None = None  # part -> measured in the runtime / predicted from the profile


def read_cost_file(path: str | Path | dict, device: str | None = None) -> CostFile:
    """The cost file at ``path`` (or its parsed contents, a dict: a profile just taken), checked (module docstring); a
    SpecError naming the file and entry otherwise. With ``device`` (the job's cluster.device), a file profiled on
    another device kind is refused: its times are not the job's devices' (a file that names no device is taken as it
    is)."""
    source = "costs" if isinstance(path, dict) else str(path)
    costs = check_cost_data(path if isinstance(path, dict) else read_json(path, COST_FILE), source)
    if device is not None and costs.device and costs.device != device:
        _fail(source, "device", costs.device, f"is not the job's cluster.device ('{device}'); its times are another "
              "device kind's", f"expected a file profiled on {device}")
    return costs


def check_cost_data(data: object, source: str = "costs") -> CostFile:
    """The parsed JSON of a cost file, checked; a SpecError naming ``source`` and the entry otherwise."""
    if not isinstance(data, dict):
        _shape(source, "the file", type(data).__name__, "is not a JSON object",
               "expected {\"points\": {\"<profile key>\": [[local_batch, seconds], ...]}, ...}")
    for key in data:
        if key not in KEYS:
            _shape(source, repr(key), "", f"is not a key of a cost file ({did_you_mean(str(key), KEYS)})",
                   "expected only " + ", ".join(KEYS))
    version = data.get("version", COST_FILE_VERSION)
    if type(version) is not int or version != COST_FILE_VERSION:
        _shape(source, "version", version, "is not a supported version", f"expected {COST_FILE_VERSION}")
    device = data.get("device", "")
    if not isinstance(device, str):
        _shape(source, "device", device, "is not a device name", "expected a string such as 'cpu'")
    if device and device not in DEVICES:
        _fail(source, "device", device, "is not a known device kind", did_you_mean(device, DEVICES))
    if "points" not in data:
        _shape(source, "points", "missing", "is required", "expected a mapping of profile key -> [[local_batch, "
               "seconds], ...]")
    rate = data.get("optimizer_s_per_param")
    if rate is not None and (not _is_number(rate) or not 0 < rate <= MAX_SECONDS_PER_PARAM):
        _fail(source, "optimizer_s_per_param", rate, "is not a finite positive number of seconds per parameter",
              f"expected AdamW seconds per parameter in (0, {MAX_SECONDS_PER_PARAM:g}] or null")
    links = _mapping(source, "links", data.get("links", {}))
    for kind in links:
        if kind not in LINK_KINDS:
            _shape(source, f"links[{kind!r}]", "", "is not a link kind", "expected " + ", ".join(LINK_KINDS))
    return CostFile(
        points=_curves(source, "points", data["points"], batch=True),
        embed=_curves(source, "embed", data.get("embed", {}), batch=True),
        head=_curves(source, "head", data.get("head", {}), batch=True),
        optimizer_s_per_param=float(rate) if rate is not None else None,
        links={kind: _curve(source, f"links[{kind!r}]", value, batch=False) for kind, value in links.items()},
        optimizer=_optimizer(source, data.get("optimizer")),
        modules=_modules(source, data.get("modules", {})),
        data=_curves(source, "data", data.get("data", {}), batch=True),
        device=device,
        forward={str(key): _curve(source, f"forward[{key!r}]", curve, batch=True, share=True)
                 for key, curve in _mapping(source, "forward", data.get("forward", {})).items()},
        calibration=_calibration(source, data.get("calibration", {})),
    )


def _calibration(source: str, value: object) -> dict[str, float]:
    """Part -> ratio, each part one of CALIBRATION_PARTS and each ratio a number in CALIBRATION_BOUNDS."""
    low, high = CALIBRATION_BOUNDS
    out = {}
    for part, ratio in _mapping(source, "calibration", value).items():
        if part not in CALIBRATION_PARTS:
            hint = did_you_mean(str(part), CALIBRATION_PARTS)
            _shape(source, f"calibration[{part!r}]", "", f"is not a calibrated part ({hint})",
                   "expected " + ", ".join(CALIBRATION_PARTS))
        if not _is_number(ratio) or not low <= ratio <= high:
            _fail(source, f"calibration[{part!r}]", ratio, f"is not a ratio in [{low:g}, {high:g}]",
                  "expected the runtime's measured time over the profile's prediction")
        out[str(part)] = float(ratio)
    return out


def _optimizer(source: str, value: object) -> tuple[float, float, float] | None:
    """The fitted optimizer step ``{"step_s", "s_per_param", "s_per_tensor"}`` (each finite and >= 0), or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or sorted(value) != sorted(OPTIMIZER_TERMS):
        _shape(source, "optimizer", value, "is not the fitted optimizer step",
               "expected {\"step_s\": s, \"s_per_param\": s, \"s_per_tensor\": s}")
    tops = (MAX_SECONDS, MAX_SECONDS_PER_PARAM, MAX_SECONDS_PER_TENSOR)
    for term, top in zip(OPTIMIZER_TERMS, tops):
        low = 0 < value[term] if term == "s_per_param" else 0 <= value[term]  # updating parameters is never free
        if not _is_number(value[term]) or not (low and value[term] <= top):
            _fail(source, f"optimizer[{term!r}]", value[term], "is not a finite number of seconds "
                  + ("> 0" if term == "s_per_param" else ">= 0"), f"expected a fitted term up to {top:g}")
    return tuple(float(value[term]) for term in OPTIMIZER_TERMS)


def _modules(source: str, value: object) -> dict[str, tuple[float, ...]]:
    """Module name -> (parameters, tensors) or (parameters, tensors, matrix parameters), each a whole number >= 0
    (a module the runtime builds; its matrices at most its parameters; files before the third entry have pairs)."""
    out = {}
    expected = "expected [parameters, tensors] or [parameters, tensors, matrix parameters]"
    for name, pair in _mapping(source, "modules", value).items():
        where = f"modules[{name!r}]"
        if not isinstance(pair, list) or len(pair) not in (2, 3) or not all(_is_number(v) for v in pair):
            _shape(source, where, pair, "is not a pair or triple of numbers", expected)
        for v, top in zip(pair, (MAX_PARAMS, MAX_TENSORS, MAX_PARAMS)):
            if not (math.isfinite(v) and float(v).is_integer() and 0 <= v <= top):
                _fail(source, where, pair, "is not a list of whole numbers >= 0",
                      f"{expected} of a module, each at most {top:g}")
        if len(pair) == 3 and pair[2] > pair[0]:
            _fail(source, where, pair, "has more matrix parameters than parameters",
                  "expected matrix parameters <= parameters (re-run `loom profile`)")
        out[str(name)] = tuple(float(v) for v in pair)
    return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(source: str, entry: str, value: object, problem: str, expected: str) -> None:
    raise SpecError(f"{source}: {entry} ({_short(value)}) {problem}; {expected}. {FIX}.")


def _shape(source: str, entry: str, value: object, problem: str, expected: str) -> None:
    """A structure error: the message starts with the file and 'not a profiled cost file'."""
    text = f" ({_short(value)})" if value != "" else ""
    raise SpecError(f"{source}: {SHAPE}: {entry}{text} {problem}; {expected}. {FIX}.")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mapping(source: str, entry: str, value: object) -> dict:
    if not isinstance(value, dict):
        _shape(source, entry, type(value).__name__, "is not a mapping", "expected {\"<name>\": [[x, seconds], ...]}")
    return value


def _curves(source: str, entry: str, value: object, batch: bool) -> dict[str, Points]:
    return {str(key): _curve(source, f"{entry}[{key!r}]", curve, batch)
            for key, curve in _mapping(source, entry, value).items()}


def _curve(source: str, entry: str, value: object, batch: bool, share: bool = False) -> Points:
    """One curve, checked and sorted by x (module docstring); with ``share``, of forward shares in (0, 1]."""
    x_name, y_name = "local batch" if batch else "bytes", "share" if share else "seconds"
    if not isinstance(value, list) or not value:
        _shape(source, entry, type(value).__name__ if not isinstance(value, list) else value,
               "is not a non-empty list", f"expected [[{x_name}, {y_name}], ...]")
    points = []
    for j, pair in enumerate(value):
        where = f"{entry}[{j}]"
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(v) for v in pair):
            _shape(source, where, pair, "is not a pair of numbers", f"expected [{x_name}, {y_name}]")
        x, t = pair
        top = MAX_BATCH if batch else MAX_BYTES
        whole = not batch or (math.isfinite(x) and float(x).is_integer())
        if not 0 < x <= top or not whole:
            _fail(source, where, pair, f"has {x_name} {x}, not a " + ("whole number >= 1" if batch else
                  "finite number > 0") + f" up to {top:g}", f"expected [{x_name}, {y_name}] with {x_name} in "
                  + ("1.." if batch else "(0, ") + f"{top:g}" + ("" if batch else "]"))
        if share and not 0 < t <= 1:
            _fail(source, where, pair, f"has share {t}, not a share in (0, 1]",
                  "expected the part of a layer's time its forward took")
        if not share and not 0 < t <= MAX_SECONDS:
            _fail(source, where, pair, f"has {t} seconds, not a time in (0, {MAX_SECONDS:g}]",
                  "expected a measured time (finite, > 0, at most a day)")
        points.append((float(x), float(t)))
    points.sort()
    for (x0, _), (x1, _) in zip(points, points[1:]):
        if x0 == x1:
            _fail(source, entry, f"{x_name} {x0:g} twice", "has duplicate points",
                  f"expected one {y_name} per {x_name}")
    if not share:
        _check_monotone(source, entry, points, x_name)
    return points


def _check_monotone(source: str, entry: str, points: Points, x_name: str) -> None:
    """More work never takes less time, beyond MONOTONE_TOLERANCE and MONOTONE_NOISE_S of noise (module docstring)."""
    top_x, top_t = points[0]
    for x, t in points[1:]:
        if t < (1 - MONOTONE_TOLERANCE) * top_t and top_t - t > MONOTONE_NOISE_S:
            _fail(source, entry, f"{x_name} {x:g}: {t:.4g} s after {x_name} {top_x:g}: {top_t:.4g} s",
                  f"is not monotone: more work takes {100 * (1 - t / top_t):.0f}% less time",
                  f"expected times that grow with the {x_name} (a dip of up to {MONOTONE_TOLERANCE:.0%} or "
                  f"{MONOTONE_NOISE_S * 1e3:g} ms is noise); a measurement went wrong")
        if t > top_t:
            top_x, top_t = x, t
