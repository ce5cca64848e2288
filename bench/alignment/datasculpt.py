"""``python -m bench.alignment.datasculpt [--no-write]``: DataSculpt packing against first-fit and concatenate-and-cut.

Packs corpora with recipes.alignment.datasculpt (the step ``datasculpt``'s own code: the LSA embedding fitted on the
corpus, k-means, the greedy multi-objective assignment) and reports, per packer, token utilisation, truncation rate,
within-window similarity (mean pairwise cosine of a window's documents) and topic purity (the share of a window's
document pairs on one topic: the known labels, independent of the embedding). Corpora: the synthetic one (five
topics) at three window sizes, three seeds each, and real text: the Python standard library's modules of eight
packages, one file a document, the package its topic, in a seeded random order (as a corpus is shuffled before
packing; in package order, first-fit and concatenate-and-cut would find related neighbours for free), written as the
documented JSONL corpus and read back.
Writes bench/results/alignment-datasculpt.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

from bench.common import write_results
from recipes.alignment import datasculpt

SYNTHETIC = ((128, 600), (512, 2000), (2048, 4000))  # (window, documents)
SEEDS = (0, 1, 2)
PACKAGES = ("asyncio", "email", "xml", "unittest", "multiprocessing", "tkinter", "importlib", "lib2to3")
REAL_WINDOW = 2048
PACKERS = {"DataSculpt": "", "first-fit": "firstfit_", "concatenate-and-cut": "concat_"}
COLUMNS = ("utilisation", "truncation_rate", "similarity", "topic_purity", "docs_per_window", "windows")


def stdlib_corpus(path: Path) -> dict:
    """The real-text corpus (module docstring) written to ``path`` as ``{"text", "topic"}`` lines."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    rows = [{"text": f.read_text(errors="ignore"), "topic": package}
            for package in PACKAGES for f in sorted((lib / package).rglob("*.py"))]
    rows = [r for r in rows if r["text"].split()]
    random.Random(0).shuffle(rows)  # a corpus in package order would hand the order-keeping packers related files
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"source": str(lib), "packages": list(PACKAGES), "documents": len(rows),
            "words": sum(len(r["text"].split()) for r in rows)}


def pack(out: Path, **kwargs) -> dict:
    start = time.perf_counter()
    metrics = datasculpt.run(out, **kwargs)
    return {"metrics": metrics, "seconds": time.perf_counter() - start}


def measure() -> dict:
    records = {"synthetic": [], "real": None}
    with tempfile.TemporaryDirectory() as tmp:
        for window, documents in SYNTHETIC:
            runs = [pack(Path(tmp) / f"s{window}-{seed}", documents=documents, window=window, seed=seed)
                    for seed in SEEDS]
            records["synthetic"].append({"window": window, "documents": documents, "seeds": list(SEEDS),
                                         "runs": runs})
        corpus = Path(tmp) / "stdlib.jsonl"
        info = stdlib_corpus(corpus)
        records["real"] = info | {"window": REAL_WINDOW,
                                  **pack(Path(tmp) / "real", corpus=corpus, window=REAL_WINDOW, clusters=16)}
    return records


def table(rows: list[tuple[str, dict]]) -> list[str]:
    lines = ["| corpus | packer | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for label, metrics in rows:
        for packer, prefix in PACKERS.items():
            cells = [f"{metrics[prefix + c]:.3f}" if c != "windows" else f"{metrics[prefix + c]:.0f}" for c in COLUMNS]
            lines.append(f"| {label} | {packer} | " + " | ".join(cells) + " |")
    return lines


def mean_metrics(runs: list[dict]) -> dict:
    return {k: statistics.mean(r["metrics"][k] for r in runs) for k in runs[0]["metrics"]}


def markdown(rec: dict) -> str:
    real = rec["real"]
    rows = [(f"synthetic, window {s['window']}, {s['documents']} docs", mean_metrics(s["runs"]))
            for s in rec["synthetic"]]
    rows.append((f"stdlib, window {real['window']}, {real['documents']} files", real["metrics"]))
    lines = ["# DataSculpt packing against first-fit", "",
             "`python -m bench.alignment.datasculpt`: recipes.alignment.datasculpt on each corpus; synthetic rows are "
             f"the mean of seeds {', '.join(map(str, SEEDS))}. Utilisation: document tokens / (windows x (window - 1)); "
             "truncation: documents split over several windows; similarity: mean pairwise cosine of a window's "
             "documents (LSA embedding fitted on the corpus); topic purity: share of a window's document pairs on "
             "one topic (the known labels). Lengths in whitespace words.", "", *table(rows), "",
             "Seconds to embed, cluster and pack (all three packers, files written): " + ", ".join(
                 f"window {s['window']}: {statistics.median(r['seconds'] for r in s['runs']):.1f} s"
                 for s in rec["synthetic"]) + f", stdlib: {real['seconds']:.1f} s.", "",
             f"Real text: {real['documents']} `.py` files ({real['words']} words) of the packages "
             f"{', '.join(real['packages'])} under `{real['source']}`, 16 clusters."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alignment.datasculpt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the report; leave bench/results alone")
    args = parser.parse_args(argv)
    rec = measure()
    report = markdown(rec)
    print(report)
    if not args.no_write:
        write_results("alignment-datasculpt", [rec], report,
                      {"synthetic": SYNTHETIC, "seeds": SEEDS, "packages": PACKAGES, "real_window": REAL_WINDOW})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
