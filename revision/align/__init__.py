"""Close the modality gap without training: fit statistics on unpaired sets, then map embeddings.

- `base`: what a method is (declared statistics and passes, text_map / image_map), the registry, the
  statistics file (`align_stats.json`) that travels with the model;
- `methods`: none, mean_shift, c3, anchor, anchor_trace, realign (one class each);
- `streams`: streaming reads (float64 chunks, bad-row policy, row sampler, pass cache);
- `run`: what embed_mean.py runs (fit, write the aligned text store, gap report).
The math of each method, as implemented: docs/design.md "Alignment".
"""
from revision.align.base import (  # noqa: F401
    REGISTRY,
    STATS_FILE,
    STATS_FORMAT,
    Alignment,
    alignment_from_dict,
    load_alignment,
    make_alignment,
    method_names,
    non_negative,
    positive,
    register,
    vector,
)
from revision.align.methods import C3, C3_NOISE_STD, Anchor, AnchorTrace, MeanShift, ReAlign  # noqa: F401
from revision.align.run import align_stores  # noqa: F401
from revision.align.streams import (  # noqa: F401
    CHUNK_ROWS,
    DEFAULT_MEMORY_BUDGET,
    WORKERS,
    BadRows,
    PassCache,
    RowSampler,
    SpilledRows,
    chunks,
    map_chunks,
    sample_rows,
    unit_mean,
)
