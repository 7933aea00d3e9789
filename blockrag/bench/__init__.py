"""Benchmarks a user runs from the command line, on their own machine and model (``blockrag bench``).

Import explicitly (``import blockrag.bench``); ``import blockrag`` never imports it.

    from blockrag.bench import measure, environment, format_table
    rows = measure(engine, sizes=(1024, 2048), passage_tokens=256, question="...", repeats=5)
"""

from blockrag.bench.ttft import (
    DEFAULT_QUESTION,
    ModeTiming,
    SizeResult,
    build_passages,
    environment,
    format_table,
    load_average,
    measure,
)

__all__ = ["DEFAULT_QUESTION", "ModeTiming", "SizeResult", "build_passages", "environment", "format_table",
           "load_average", "measure"]
