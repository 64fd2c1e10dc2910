"""GPU benchmark scripts of the kernels (each prints a table and writes JSON naming the device); not tests.

Run one as a module, e.g. `python -m kernels.bench.hybrid_attention_bench --quick`.
"""
