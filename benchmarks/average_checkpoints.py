r"""Uniform weight average of kept checkpoints ("model soup" of one run), written as a model folder
that `pallm eval` reads. Exploratory tool behind docs/stage2_experiments.md's eleventh look: stage 2 oscillates
between checkpoints, and the average of the last few is steadier than any one of them.

    python benchmarks/average_checkpoints.py runs/e16/seed45/soup_grpo \
        runs/e16/seed45/grpo/checkpoints/step-{250,300,350,400}
    pallm eval --model runs/e16/seed45/soup_grpo --data cache/parasynth-97086248003b --no-probes

The averaging is pallm's `average_checkpoints` (what `average_last_checkpoints: N` publishes at the
end of a run): tensor by tensor, summed in float64, the last folder's config, processor and shard
layout; a LoRA adapter is refused with the merge command. Prints the output folder; refuses to
replace an existing one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pallm.errors import PallmError
from pallm.model.build import average_checkpoints


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, sources = Path(sys.argv[1]), sys.argv[2:]
    if out.exists():
        sys.exit(f"{out}: exists; choose another output folder or remove it first")
    try:
        average_checkpoints(sources, out, {})
    except PallmError as e:
        sys.exit(str(e))
    print(out)


if __name__ == "__main__":
    main()
