"""Benchmark suites (not tests): each writes JSON and markdown under bench/results/. Nothing imports bench."""
