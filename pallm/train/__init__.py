"""Training: stage 1 (`sft`) and the plumbing stage 2 reuses (`common`). See docs/training.md.

    from pallm.train import SFTConfig, train_sft
    summary = train_sft(SFTConfig(steps=400), ModelSpec(), PromptConfig(), corpus_dir, "runs/x/sft")
"""

from pallm.train.examples import AudioCache, Example, build_examples, tokenizer_texts
from pallm.train.sft import SFTConfig, train_sft

__all__ = ["AudioCache", "Example", "SFTConfig", "build_examples", "tokenizer_texts", "train_sft"]
