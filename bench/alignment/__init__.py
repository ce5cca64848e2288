"""python -m bench.alignment: recipe alignment trained on CPU and scored (bench/results/alignment.md)."""
