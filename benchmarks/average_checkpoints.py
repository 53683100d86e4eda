r"""Uniform weight average of kept checkpoints ("model soup" of one run), written as a model folder
that `pallm eval` reads. Exploratory tool behind docs/grpo.md's eleventh look: stage 2 oscillates
between checkpoints, and the average of the last few is steadier than any one of them.

    python benchmarks/average_checkpoints.py runs/e16/seed45/soup_grpo \
        runs/e16/seed45/grpo/checkpoints/step-{250,300,350,400}
    pallm eval --model runs/e16/seed45/soup_grpo --data cache/parasynth-97086248003b --no-probes

The last folder given supplies the config, tokenizer and pallm.json; full checkpoints only (no
LoRA adapters). Prints the output folder; refuses to replace an existing one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, sources = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    if out.exists():
        sys.exit(f"{out}: exists; choose another output folder or remove it first")
    for p in sources:
        if not (p / "model.safetensors").exists():
            sys.exit(f"{p}: no model.safetensors (a kept checkpoint folder, e.g. RUN/checkpoints/step-400, is needed)")
    states = [load_file(p / "model.safetensors") for p in sources]
    if any(s.keys() != states[0].keys() for s in states):
        sys.exit("the checkpoints hold different tensors: average checkpoints of one run only")
    mean = {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}
    shutil.copytree(sources[-1], out, ignore=shutil.ignore_patterns("trainer", "trainer_state.json", "eval-*", "checkpoints"))
    save_file(mean, out / "model.safetensors", metadata={"format": "pt"})
    print(out)


if __name__ == "__main__":
    main()
