"""Source files copied into every exported Hugging Face model directory (`linearize export`).

They are never imported from here: in an export directory they sit next to copies of
kernels/hybrid_attention/naive.py and blocks/feature_map.py, which they import relatively, and
transformers loads them with `trust_remote_code=True` in a process that knows nothing of this project.
"""
