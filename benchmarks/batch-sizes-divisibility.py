"""Which of the proof's first-stage batches give the kernels a compressed-token count divisible by 16 (issue
11). Triton specialized the range and top-n kernels on that count, so the first batch where it was a
multiple of 16 compiled them all again. Replays the training stream on CPU, no model (data/code built by
tools/build_code_corpus.py); from the repository root:

    python benchmarks/batch-sizes-divisibility.py                 # v15's data seed
    python benchmarks/batch-sizes-divisibility.py data.seed=1     # v17-s1long-s1's

Measured in benchmarks/kernels-notes.md, Session 24.
"""
import math
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed")
from kernels.common import host_bounds  # noqa: E402
from kernels.compression.naive import compressed_bounds  # noqa: E402
from nsa_dist.config import load_config  # noqa: E402
from nsa_dist.data import RankRows, document_eod, packed_seq_params, stage_sequences  # noqa: E402

config = load_config("configs/proof_100m.yaml", sys.argv[1:])
stage, nsa = config.stages[0], config.nsa
rows = iter(RankRows(stage_sequences(config, stage.seq_len, stage.mix), stage.global_batch_size,
                     stage.micro_batch_size, dp_rank=0, dp_size=1))
for step in range(1, 9):
    tokens, _ = next(rows)
    bounds = host_bounds(packed_seq_params(tokens[:, :-1], document_eod(config)).cu_seqlens_q)
    compressed = compressed_bounds(bounds, nsa.compress_block, nsa.stride)[-1]
    key_blocks = sum(math.ceil((hi - lo) / nsa.selection_block) for lo, hi in zip(bounds[:-1], bounds[1:]))
    print(f"step {step}: {len(bounds) - 1} documents, compressed tokens {compressed} (mod 16: {compressed % 16}), "
          f"key blocks {key_blocks} (mod 16: {key_blocks % 16})")
