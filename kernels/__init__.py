"""The math of each attention, one folder per op: naive.py (pure PyTorch ground truth) and fast paths.

Keep this file free of imports: transformers probes for an optional hub package also named
`kernels` (`is_kernels_available`), and a cheap, version-less module keeps that probe False.
"""
