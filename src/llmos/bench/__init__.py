"""Benchmarks: llmos against named peers, side by side in one run (`llmos bench`, `benchmarks/`).

The names below load lazily, so `python -m llmos.bench.systems` (one system's subprocess) imports only what it runs.
"""

__all__ = ["BenchConfig", "DEFAULT_SYSTEMS", "QUICK", "Workload", "run_benchmark"]


def __getattr__(name: str):
    if name in __all__:
        from llmos.bench import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'llmos.bench' has no attribute {name!r}")
