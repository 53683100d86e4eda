r"""Uniform weight average of kept checkpoints ("model soup" of one run), written as a model folder
that `pallm eval` reads. Exploratory tool behind docs/grpo.md's eleventh look: stage 2 oscillates
between checkpoints, and the average of the last few is steadier than any one of them.

    python benchmarks/average_checkpoints.py runs/e16/seed45/soup_grpo \
        runs/e16/seed45/grpo/checkpoints/step-{250,300,350,400}
    pallm eval --model runs/e16/seed45/soup_grpo --data cache/parasynth-97086248003b --no-probes

Checkpoints are read and written with pallm's own `load_pretrained` / `save_checkpoint` (sharded
weights included; a LoRA adapter is refused with the merge command). The last folder given
supplies the processor and pallm.json. The running sum is kept in float64, one model loaded at a
time beside it. Prints the output folder; refuses to replace an existing one.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pallm.errors import PallmError
from pallm.model.build import load_pretrained, read_pallm_meta, save_checkpoint


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, sources = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    if out.exists():
        sys.exit(f"{out}: exists; choose another output folder or remove it first")
    try:
        total = None
        for p in sources:
            model, processor = load_pretrained(p)
            state = model.state_dict()
            if total is not None and state.keys() != total.keys():
                sys.exit(f"{p}: holds different tensors from {sources[0]}: average checkpoints of one run only")
            total = {k: v.double() + (total[k] if total else 0) for k, v in state.items()}
        model.load_state_dict({k: (v / len(sources)).to(state[k].dtype) for k, v in total.items()})
        meta = {**read_pallm_meta(sources[-1]), "averaged_from": [str(p) for p in sources]}
        save_checkpoint(model, processor, out, meta)
    except PallmError as e:
        sys.exit(str(e))
    print(out)


if __name__ == "__main__":
    main()
