"""GRPO throughput: PALLM's trainer (audio in) next to TRL's GRPOTrainer on the text-only task.

    python benchmarks/grpo_bench.py                      # tiny defaults, ~1-2 minutes on 2 cores
    python benchmarks/grpo_bench.py --steps 8 --batch 4 --generations 8 --max-completion 32

Both sides run the same step: `--batch` prompts x `--generations` completions, sampled at
temperature 1 up to `--max-completion` tokens, scored by the same reward functions (pallm's
`format` and `sentiment_accuracy`), one optimizer step (loss_type dapo, beta 0, one iteration),
one CPU thread each, each in its own process (so peak RSS is its own).

- PALLM: `train_grpo` on the tiny Qwen2-Audio (random init) with the audio clips of a synthetic
  corpus (the prompt carries the transcript too, as in the real task).
- TRL: `trl.GRPOTrainer` on a `Qwen2ForCausalLM` built from config with the tiny model's text sizes
  and the very same tokenizer, on the same prompts without audio (the transcript is all it gets).

The audio side has more to do per step (mel features, the audio encoder, ~25 audio tokens per
second of clip in every forward), so a ratio near or below 1 means the trainer itself adds no
overhead. Prints numbers; it is not a test. The first step of each side is a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SENTS = ("positive", "negative", "neutral")
WORDS = ("I really think this is fine", "we could go there tomorrow", "that was the plan all along",
         "nobody told me about it", "the weather is changing again", "let us talk about it later")


def make_corpus(base: Path, n: int = 48) -> Path:
    import soundfile as sf

    from pallm.data.manifest import Row, write_manifest

    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        seconds = 1.0 + 2.0 * rng.random()  # 1-3 s clips: 25-75 audio tokens each
        t = np.arange(int(16_000 * seconds)) / 16_000
        wav = 0.2 * np.sin(2 * np.pi * (120 + 5 * i) * t * (1 + 0.1 * np.sin(3 * t)))
        sf.write(base / f"c{i}.wav", wav.astype(np.float32), 16_000, subtype="PCM_16")
        rows.append(Row(id=f"c{i}", audio=f"c{i}.wav", corpus="bench", speaker=f"s{i % 4}", split="train",
                        sentiment=SENTS[i % 3], transcript=WORDS[i % len(WORDS)], response="I hear you.",
                        cues={"pitch_level": "mid", "pitch_variability": "low", "loudness": "high", "rate": "mid"}))
    write_manifest(rows, base, overwrite=True)
    return base


def tiny_model(corpus: Path):
    from pallm.data.manifest import read_manifest
    from pallm.model import build_tiny
    from pallm.prompts.format import PromptConfig
    from pallm.train.examples import tokenizer_texts

    return build_tiny(tokenizer_texts(read_manifest(corpus), PromptConfig()))


def run_pallm(args, corpus: Path, work: Path) -> dict:
    from pallm.model import count_parameters
    from pallm.prompts.format import PromptConfig
    from pallm.train.common import peak_rss_mb
    from pallm.train.grpo import GRPOConfig, train_grpo

    model, processor = tiny_model(corpus)
    cfg = GRPOConfig(steps=args.steps + 1, per_device_batch_size=args.batch, num_generations=args.generations,
                     max_completion_length=args.max_completion, learning_rate=1e-5, loss_type="dapo", beta=0.0,
                     reward_funcs=["format", "sentiment_accuracy"], task_weights={"classify": 1.0}, save_every=0,
                     eval_every=0, threads=1)
    stamps: list[float] = []
    summary = train_grpo(cfg, PromptConfig(), corpus, (model, processor), work / "pallm", overwrite=True,
                         progress=lambda step, total, m: stamps.append(time.perf_counter()))
    logs = [json.loads(x) for x in (work / "pallm" / "train_log.jsonl").read_text().splitlines()][1:]  # drop warm-up
    timed = stamps[-1] - stamps[0]
    tokens = sum(r["completion_length"] * args.batch * args.generations for r in logs)
    return {
        "steps_per_s": args.steps / timed,
        "rollout_tokens_per_s": tokens / sum(r["time/generate"] for r in logs),
        "completion_length": float(np.mean([r["completion_length"] for r in logs])),
        "time_generate_s": float(np.mean([r["time/generate"] for r in logs])),
        "time_reward_s": float(np.mean([r["time/reward"] for r in logs])),
        "time_backward_s": float(np.mean([r["time/backward"] + r["time/score"] for r in logs])),
        "peak_rss_mb": peak_rss_mb(),
        "parameters": count_parameters(model),
        "summary_examples_per_s": summary["examples_per_s"],
    }


def run_trl(args, corpus: Path, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from pallm.data.manifest import read_manifest
    from pallm.model import count_parameters
    from pallm.prompts.format import PromptConfig, build_prompt
    from pallm.rewards import get_reward
    from pallm.train.common import peak_rss_mb

    torch.set_num_threads(1)
    audio_model, processor = tiny_model(corpus)
    tok = processor.tokenizer
    text = audio_model.config.text_config
    config = Qwen2Config(vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                         num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                         num_key_value_heads=text.num_key_value_heads, max_position_embeddings=text.max_position_embeddings,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=text.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    rows = read_manifest(corpus)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": build_prompt("classify", r, PromptConfig())}],
                               "task": "classify", "sentiment": r.sentiment} for r in rows])
    per_step: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            per_step.append(time.perf_counter() - self.t)

    cfg = TRLConfig(output_dir=str(work / "trl"), max_steps=args.steps + 1, per_device_train_batch_size=args.batch * args.generations,
                    num_generations=args.generations, max_completion_length=args.max_completion, learning_rate=1e-5,
                    loss_type="dapo", beta=0.0, temperature=1.0, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[get_reward("format"), get_reward("sentiment_accuracy")], args=cfg,
                          train_dataset=data, processing_class=tok, callbacks=[Clock()])
    # TRL's own profiling only reports to wandb/mlflow/trackio: time its generation and reward calls here.
    spent = {"generate": [], "reward": []}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key].append(time.perf_counter() - t0)
        return wrapper

    trainer._generate_single_turn = timed(trainer._generate_single_turn, "generate")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    length = float(np.mean([h["completions/mean_length"] for h in logs]))
    gen, rew, step = np.mean(spent["generate"][1:]), np.mean(spent["reward"][1:]), np.mean(per_step[1:])
    return {
        "steps_per_s": args.steps / sum(per_step[1:]),
        "completion_length": length,
        "rollout_tokens_per_s": length * args.batch * args.generations / gen,
        "time_generate_s": float(gen),
        "time_reward_s": float(rew),
        "time_backward_s": float(step - gen - rew),  # the rest of the step: log-probs, loss, backward, optimizer
        "peak_rss_mb": peak_rss_mb(),
        "parameters": count_parameters(model),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-completion", type=int, default=32)
    ap.add_argument("--side", choices=["pallm", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.side:  # child process: one side, JSON on the last line
        import torch

        torch.set_num_threads(1)
        work = Path(args.work)
        res = (run_pallm if args.side == "pallm" else run_trl)(args, work / "corpus", work)
        print(json.dumps(res))
        return

    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as tmp:
        work = Path(tmp)
        make_corpus(work / "corpus")
        results = {}
        for side in ("pallm", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--work", str(work), "--steps", str(args.steps), "--batch",
                   str(args.batch), "--generations", str(args.generations), "--max-completion", str(args.max_completion)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])

    p, t = results["pallm"], results["trl"]
    print(f"GRPO step: {args.batch} prompts x {args.generations} completions, <= {args.max_completion} new tokens, "
          f"{args.steps} timed steps, 1 CPU thread")
    rows = [("parameters", "parameters", "{:,.0f}"), ("steps/s", "steps_per_s", "{:.3f}"),
            ("rollout tokens/s", "rollout_tokens_per_s", "{:.0f}"), ("mean completion length", "completion_length", "{:.1f}"),
            ("time generate (s/step)", "time_generate_s", "{:.3f}"), ("time reward (s/step)", "time_reward_s", "{:.4f}"),
            ("time update (s/step)", "time_backward_s", "{:.3f}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}")]
    print(f"{'':28s}{'PALLM (audio)':>16s}{'TRL (text only)':>18s}")
    for name, key, fmt in rows:
        cell = lambda d: fmt.format(d[key]) if key in d else "-"  # noqa: E731
        print(f"{name:28s}{cell(p):>16s}{cell(t):>18s}")
    print(f"ratio PALLM/TRL steps/s: {p['steps_per_s'] / t['steps_per_s']:.2f}")
    print(f"ratio PALLM/TRL rollout tokens/s: {p['rollout_tokens_per_s'] / t['rollout_tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
