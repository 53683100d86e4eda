"""Stage 2: multi-task GRPO on audio (sentiment with chain-of-thought + paralinguistics-aware replies).

    from pallm.train.grpo import GRPOConfig, train_grpo
    summary = train_grpo(GRPOConfig(steps=100), PromptConfig(), "data/parasynth", "runs/x/sft", "runs/x/grpo")

No RL library takes audio inputs, so this is PALLM's own trainer (this file + rollout.py), TRL's GRPOConfig names
and semantics (docs/grpo.md maps them), `accelerate` for DDP. One optimizer step:

    prompts (tasks mixed by weight; one prompt = one group = one task)
      -> G completions each (a RolloutBackend; token ids, so we score exactly what was sampled)
      -> reward functions (None = does not apply to this row: that is how tasks route)
      -> group-relative advantages (rewards gathered over all processes first)
      -> clipped surrogate [+ beta * k3 KL to the frozen reference], loss_type normalisation
      -> backward, (accumulate), clip, AdamW step

The pure pieces (advantages, losses, KL) are functions at the top, tested on hand-made tensors.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, model_validator

from pallm.data.manifest import Row, manifest_path, read_manifest
from pallm.errors import ConfigError, PallmError
from pallm.evaluate.predict import model_audio
from pallm.model import encode_batch, load_pretrained
from pallm.model.batch import pad_token_id
from pallm.model.families import family_of
from pallm.model.build import PALLM_META_FILE, read_pallm_meta
from pallm.prompts.format import TASKS, PromptConfig, build_prompt, label_set, parse_completion
from pallm.train.common import (
    AudioCache,
    BestModelFields,
    LoraSettings,
    RunLogger,
    apply_lora,
    base_model,
    check_resume,
    clear_run,
    dev_record,
    finish_run,
    build_optimizer,
    build_scheduler,
    freeze_audio_encoder,
    is_peft,
    is_sharded,
    latest_checkpoint,
    load_training_checkpoint,
    make_accelerator,
    peak_rss_mb,
    read_dev_curve,
    save_training_checkpoint,
    seed_everything,
    set_threads,
    trainable_parameters,
)
from pallm.train.examples import (
    Example,
    ExampleStream,
    can_serve,
    check_cues,
    TaskWeights,
    check_task_weights,
    gold,
    select_dev_rows,
    select_train_rows,
)
from pallm.train.rollout import HFBackend, RolloutBackend, cut_at_stop, stop_token_ids

ProgressFn = Callable[[int, int, dict], None]
# Row fields handed to every reward function, one value per completion (TRL passes dataset columns).
REWARD_ROW_FIELDS = ("id", "sentiment", "emotion", "lexical_sentiment", "congruent", "transcript", "response", "cues", "cue_z")
STD_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4)


class GRPOConfig(BestModelFields):
    """Stage-2 settings (`grpo:` section). Names follow TRL's GRPOConfig (docs/grpo.md maps each
    one); `per_device_batch_size` counts PROMPTS (groups), not completions."""

    model_config = ConfigDict(extra="forbid")

    # 400: on the tiny default, 200 steps moved the model off the words without teaching it to hear
    # better (congruent rows lost 6 points against stage 1 of the same budget, 3 seeds); by 400 it
    # gains on both (docs/grpo.md, "Stage 2 against stage 1"). Alone on a 2-core CPU: 209 s on
    # 2026-11-30's machine, ~400 s on a slower one (docs/grpo.md, "Where the time goes").
    steps: int = Field(400, ge=1, description="optimizer steps (TRL max_steps)")
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "constant_with_warmup"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; null or 0 = off")
    per_device_batch_size: int = Field(4, ge=1, description="prompts per process per micro-batch")
    num_generations: int = Field(8, ge=2, description="G: completions per prompt (one group)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_completion_length: int = Field(96, ge=1)
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient to the frozen init; 0 = no reference model")
    epsilon: float = Field(0.2, gt=0)
    epsilon_high: float | None = Field(None, gt=0, description="upper clip; null = epsilon (DAPO: 0.28)")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, ge=1, description="optimizer steps per generation batch (mu)")
    reward_funcs: list[str] = ["format", "sentiment_accuracy", "emotion_accuracy", "cue_grounding",
                               "affect_grounding", "response_judge", "length_penalty"]
    reward_weights: list[float] | None = None  # null: 1.0 each
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    task_weights: TaskWeights = {"classify": 0.5, "respond": 0.5}
    dynamic_sampling: bool = False  # DAPO: replace zero-variance groups by fresh prompts
    dynamic_sampling_max_tries: int = Field(2, ge=1, description="refill rounds per micro-batch")
    # Share of prompts drawn from classify rows the model recently got (partly) wrong, weighted by
    # the error rate of their last group; 0 = off. The rest come from the epoch stream.
    oversample_hard: float = Field(0.0, ge=0.0, lt=1.0)
    # Share of prompts drawn (as classify) from train rows whose words and voice disagree; 0 = off.
    # Stage 1 data is mostly congruent, so words predict the label there: conflict prompts are
    # where the accuracy reward punishes the lexical shortcut.
    conflict_share: float = Field(0.25, ge=0.0, lt=1.0)
    # Share of prompts shown without their transcript (modality dropout; only when prompt.transcript
    # is on). There the reward can only be earned by hearing the voice, and a model that follows the
    # words confidently is unsure without them, so its groups have reward variance to learn from.
    transcript_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Stage-1 loss mixed into every update (InstructGPT's "PPO-ptx", OpenRLHF's ptx_coef): the
    # negative log-likelihood of the stage-1 targets of `ptx_batch_size` train examples per process,
    # times ptx_coef, added to each optimizer step. Keeps what continued SFT would still gain while
    # RL moves the model off the words. 0 = off.
    ptx_coef: float = Field(0.0, ge=0.0)
    ptx_batch_size: int = Field(8, ge=1, description="stage-1 examples per process per optimizer step")
    # Weight each classify group's advantages by (1 / running recall of its voice class)^class_balance,
    # normalised to mean 1 over the classes: a class the policy is losing keeps its share of the
    # gradient instead of being outvoted (on ParaSynth, angry voices answered like happy ones). 0 = off.
    class_balance: float = Field(0.0, ge=0.0)
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (0 = only the final model)")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(50, ge=0, description="dev evaluation (classify) every N steps and at the end; 0 = off")
    eval_rows: int = Field(64, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, description="torch CPU threads per process; null = torch's default "
                                 "(OMP_NUM_THREADS, which accelerate launch sets to cores / processes; else every core)")
    seed: int | None = Field(None, description="overrides the run seed when set")
    mixed_precision: Literal["no", "bf16", "auto"] = "auto"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze_audio_encoder: bool = False
    # Recompute activations in the backward pass (memory for compute; docs/scale_out.md). Needs
    # train mode, so dropout is switched off first (TRL's disable_dropout), as eval mode does otherwise.
    gradient_checkpointing: bool = False
    audio_cache: Literal["int16", "float32"] = "int16"
    # Rollouts from a vLLM engine colocated with each process (TRL's names; pallm/train/rollout_vllm.py).
    use_vllm: bool = False
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="GPU share of each colocated vLLM engine")
    vllm_max_model_length: int | None = Field(None, ge=1, description="vLLM context; null = the model's")

    @model_validator(mode="after")
    def _rewards(self) -> GRPOConfig:
        if not self.reward_funcs:
            raise ValueError("reward_funcs: name at least one reward")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs")
        return self

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_hi(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# Fields that change what a resumed run computes; a checkpoint made with other values is refused.
_RESUME_KEYS = ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "per_device_batch_size",
                "num_generations", "gradient_accumulation_steps", "temperature", "top_p", "max_completion_length", "beta",
                "epsilon", "epsilon_high", "loss_type", "scale_rewards", "num_iterations", "reward_funcs", "reward_weights",
                "multi_objective_aggregation", "task_weights", "dynamic_sampling", "dynamic_sampling_max_tries",
                "oversample_hard", "conflict_share", "transcript_dropout", "mixed_precision", "lora", "freeze_audio_encoder", "ptx_coef",
                "ptx_batch_size", "class_balance")


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout (modules, and attention dropout read from `attention_dropout`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0


# --- the algorithm: pure functions ----------------------------------------------------------------


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample std (Bessel) ignoring NaNs; NaN where fewer than two values (as TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    ss = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) if dim is not None else torch.nansum((x - mean) ** 2)
    var = torch.where(n > 1, ss / (n - 1).clamp(min=1), torch.full_like(ss, float("nan")))
    out = var.sqrt()
    return out if keepdim or dim is None else out.squeeze(dim)


def weighted_total(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k r_k over the functions that apply (non-NaN); NaN when none applies (unscorable)."""
    total = torch.nansum(rewards * weights, dim=1)
    return torch.where(torch.isnan(rewards).all(dim=1), torch.full_like(total, float("nan")), total)


def compute_advantages(rewards: torch.Tensor, weights: torch.Tensor, num_generations: int,
                       scale_rewards: str = "group", aggregation: str = "sum_then_normalize"):
    """Group-relative advantages, as TRL computes them.

    `rewards` is (N, F): N = groups x G completions (group-major), one column per reward function,
    NaN where a function returned None. Returns (advantages (N,), total reward (N,), zero-variance
    flag per group (N // G,)). A group is zero-variance when its total rewards are all equal (or
    fewer than two are scorable): its advantages are 0 and it teaches nothing.

    sum_then_normalize: r = Σ w_k r_k; A = r - mean_group(r), divided by (std + 1e-4) of the group
    (`group`), of the whole batch (`batch`) or not at all (`none`, Dr. GRPO).
    normalize_then_sum (GDPO): each function normalised within its group first, then the weighted
    sum is normalised over the batch. Unscorable completions get A = 0.
    """
    G = num_generations
    if rewards.shape[0] % G:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {G}")
    total = weighted_total(rewards, weights)
    group_std = nanstd(total.view(-1, G), dim=1)
    zero_var = torch.isnan(group_std) | torch.isclose(group_std, torch.zeros_like(group_std))
    if aggregation == "sum_then_normalize":
        mean = torch.nanmean(total.view(-1, G), dim=1).repeat_interleave(G)
        adv = total - mean
        if scale_rewards == "group":
            adv = adv / (group_std.repeat_interleave(G) + STD_EPS)
        elif scale_rewards == "batch":
            adv = adv / (nanstd(total) + STD_EPS)
        elif scale_rewards != "none":
            raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    elif aggregation == "normalize_then_sum":
        grouped = rewards.view(-1, G, rewards.shape[1])
        per_fn = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + STD_EPS)
        summed = torch.nansum(per_fn.view(-1, rewards.shape[1]) * weights, dim=1)
        summed = torch.where(torch.isnan(total), torch.full_like(summed, float("nan")), summed)  # unscorable stays out
        adv = (summed - torch.nanmean(summed)) / (nanstd(summed) + STD_EPS)
    else:
        raise ValueError(f"multi_objective_aggregation must be sum_then_normalize or normalize_then_sum, got {aggregation!r}")
    return torch.nan_to_num(adv, nan=0.0), total, zero_var


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || ref) on sampled tokens: e^(ref-logp) - (ref-logp) - 1.
    Non-negative, 0 exactly where the two agree, unbiased under sampling from the policy."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, as a loss: -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) with
    ρ = exp(logp - old_logp). Returns (loss per token, clipped flag per token: ρ left the range in
    the direction the advantage pushes it, so the token gets no gradient)."""
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    clipped = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, clipped


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int,
                   num_tokens: float | None = None) -> torch.Tensor:
    """Per-token losses (B, T) -> scalar, as TRL's loss types.

    grpo: mean over each sequence's tokens, then over sequences (favours short right answers);
    dr_grpo: Σ / (B · max_completion_length), a constant, no length bias;
    dapo: Σ / number of completion tokens, a token-level mean. `num_tokens` (default: this
    batch's) lets the trainer divide by the tokens of the whole generation batch instead.
    """
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype)
        return (per_token * mask).sum() / n.clamp(min=1)
    raise ValueError(f"loss_type must be grpo, dr_grpo or dapo, got {loss_type!r}")


def completion_tensors(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids and their loss mask (1 on sampled tokens up to and including
    the first stop token, 0 on padding)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# --- scoring: log-probs of sampled tokens ---------------------------------------------------------


class _Captured(Exception):
    pass


class PolicyScorer(torch.nn.Module):
    """Per-token log-probabilities and entropies of completion tokens under the policy.

    accelerate wraps THIS module (DDP) rather than the model, for two savings:

    - the audio is encoded once per prompt, not once per completion: the prompt embeddings (text +
      audio encoder + projector, with gradients) are computed for the B prompts and repeated over
      their G completions. On the tiny model the encoder was 2/3 of a step's backward time.
    - the language model runs over each prompt once too: the prompt's keys and values (with
      gradients) are repeated over its G completions, which then attend to them as to a KV cache.
      A classify prompt (~75 audio + ~60 text tokens) is three times its completion, so this cuts
      the language model's work per step about in half. Gradient checkpointing drops caches, so
      with it on the full (prompt + completion) rows are run instead; both give the same numbers.
    - the LM head runs on completion positions only: a Qwen2-Audio vocabulary (152k) over every
      audio and prompt position would cost more memory than the 7B model itself.
    - the groups are scored in up to `max_chunks` passes, groups of similar completion length
      together, each padded only to its own longest completion (and prompt): a short classify
      group no longer pads to the longest reply. On the tiny default, 2 chunks cut the update of
      a 4 x 8 micro-batch from 0.55 to 0.42 s; 3 or 4 gained at most 0.01 s more.

    Layout: prompt left-padded (as at generation time), completion right-padded after it,
    positions counted over real tokens only -- so the log-probs are those of the distribution
    the tokens were sampled from (at `temperature`). Prompt tensors have B rows, completion
    tensors B*G rows (group-major); the outputs are [B*G, completion width], 0 past each chunk's
    width (padding only).
    """

    def __init__(self, policy, temperature: float, max_chunks: int = 2):
        super().__init__()
        self.policy = policy
        self.temperature = temperature
        self.max_chunks = max_chunks

    def _base(self):
        return base_model(self.policy)

    def _prompt_embeds(self, core, prompt_ids, prompt_mask, input_features, feature_attention_mask):
        """The model's own audio+text merge for the prompts, captured where it enters the language
        model (so no family internals are copied here); the language model itself is not run."""
        captured = {}

        def grab(module, args, kwargs):
            captured["embeds"] = kwargs["inputs_embeds"]
            raise _Captured

        handle = core.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            core(input_ids=prompt_ids, attention_mask=prompt_mask, input_features=input_features,
                 feature_attention_mask=feature_attention_mask, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured["embeds"]

    def forward(self, prompt_ids, prompt_mask, input_features, feature_attention_mask, completion_ids, completion_mask,
                with_entropy: bool = True):
        base = self._base()
        prompt_embeds = self._prompt_embeds(base.model, prompt_ids, prompt_mask, input_features, feature_attention_mask)
        B = prompt_ids.shape[0]
        G = completion_ids.shape[0] // B
        if min(self.max_chunks, B) <= 1:
            return self._score(base, prompt_embeds, prompt_mask, completion_ids, completion_mask, with_entropy)
        longest = completion_mask.view(B, G, -1).sum(-1).amax(-1)  # each group's longest completion
        width = completion_ids.shape[1]
        logps, entropies, order = [], [], []
        for groups in longest.argsort().chunk(self.max_chunks):
            rows = (groups[:, None] * G + torch.arange(G, device=groups.device)).reshape(-1)
            c = int(longest[groups].max())
            p = int(prompt_mask[groups].sum(-1).max())  # prompts are left-padded: keep their last p columns
            logp, entropy = self._score(base, prompt_embeds[groups, -p:], prompt_mask[groups, -p:],
                                        completion_ids[rows, :c], completion_mask[rows, :c], with_entropy)
            logps.append(torch.nn.functional.pad(logp, (0, width - c)))
            if with_entropy:
                entropies.append(torch.nn.functional.pad(entropy, (0, width - c)))
            order.append(rows)
        back = torch.cat(order).argsort()  # chunk order -> group-major order
        return torch.cat(logps)[back], (torch.cat(entropies)[back] if with_entropy else None)

    def _score(self, base, prompt_embeds, prompt_mask, completion_ids, completion_mask, with_entropy: bool):
        """Log-probs (and entropies) of the completions after their prompts' embeddings."""
        core = base.model
        lm = core.language_model
        G = completion_ids.shape[0] // prompt_embeds.shape[0]
        mask = torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        completion_embeds = core.get_input_embeddings()(completion_ids)
        p, c = prompt_embeds.shape[1], completion_ids.shape[1]
        if (getattr(lm, "gradient_checkpointing", False) and lm.training) or G == 1:
            embeds = torch.cat([prompt_embeds.repeat_interleave(G, 0), completion_embeds], 1)
            hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            hidden = hidden[:, -c - 1 : -1]
        else:
            out = lm(inputs_embeds=prompt_embeds, attention_mask=prompt_mask, position_ids=pos[::G, :p], use_cache=True)
            out.cache.batch_repeat_interleave(G)  # differentiable: each prompt's K/V now feeds G rows
            after = lm(inputs_embeds=completion_embeds, attention_mask=mask, position_ids=pos[:, p:], use_cache=True,
                       cache=out.cache).last_hidden_state
            # The prompt's last position predicts each completion's first token.
            hidden = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(G, 0), after[:, :-1]], 1)
        logits = base.get_output_embeddings()(hidden).float() / self.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
        return logp, entropy


# --- data: what each process samples --------------------------------------------------------------


class PromptSampler:
    """Prompts for GRPO, identical on every process (each takes its own slice of every draw).

    Draws come from the stage-1 example stream (each train row once per epoch, tasks by weight,
    deterministic in the seed) or, with `oversample_hard`, from a pool of classify rows whose last
    group was partly wrong, weighted by that group's error rate. Its whole state is small JSON, so
    resuming continues the exact same sequence."""

    def __init__(self, stream: ExampleStream, rows: Sequence[Row], prompt_cfg: PromptConfig, labels: list[str],
                 oversample_hard: float, seed: int, conflict_share: float = 0.0, transcript_dropout: float = 0.0):
        self.stream, self.prompt_cfg, self.labels, self.hard_share = stream, prompt_cfg, labels, oversample_hard
        self.rows = {r.id: r for r in rows}
        self.conflict_ids = sorted(r.id for r in rows if r.congruent is False)
        self.conflict_share = conflict_share if self.conflict_ids else 0.0
        self.transcript_dropout = transcript_dropout if prompt_cfg.transcript else 0.0
        self.no_words_cfg = prompt_cfg.model_copy(update={"transcript": False})
        self.consumed = 0
        self.pool: dict[str, float] = {}  # row id -> accuracy of its last group (< 1)
        self.rng = np.random.default_rng(seed + 7919)

    def _classify(self, row_id: str) -> Example:
        row = self.rows[row_id]
        return Example(row, "classify", build_prompt("classify", row, self.prompt_cfg, self.labels), "")

    def draw(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.hard_share and self.pool and self.rng.random() < self.hard_share:
                ids = sorted(self.pool)
                w = np.array([1.0 - self.pool[i] for i in ids])
                out.append(self._classify(ids[int(self.rng.choice(len(ids), p=w / w.sum()))]))
            elif self.conflict_share and self.rng.random() < self.conflict_share:
                out.append(self._classify(self.conflict_ids[int(self.rng.integers(len(self.conflict_ids)))]))
            else:
                out.append(self.stream.take(self.consumed, 1)[0])
                self.consumed += 1
            if self.transcript_dropout and self.rng.random() < self.transcript_dropout:
                e = out[-1]
                out[-1] = Example(e.row, e.task, build_prompt(e.task, e.row, self.no_words_cfg, self.labels), "", transcript=False)
        return out

    def update(self, results: Sequence[tuple[str, float]]) -> None:
        """(row id, accuracy of its group) for classify groups, from every process."""
        if not self.hard_share:
            return
        for rid, acc in results:
            if acc < 1.0:
                self.pool[rid] = acc
            else:
                self.pool.pop(rid, None)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "pool": dict(self.pool), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.consumed, self.pool = int(s["consumed"]), {k: float(v) for k, v in s["pool"].items()}
        self.rng.bit_generator.state = s["rng"]


class ClassRecall:
    """Running accuracy of classify groups per voice class (the row's emotion, else its gold label),
    from every process's rollouts, and the advantage weight of each class under `class_balance`.

    Recall is an exponential moving average over groups (`momentum` per group of that class), and
    the weights come from rollouts already made, so they are the same on every process and causal.
    A recall below `floor` counts as `floor` (the weight of a class then stops growing)."""

    def __init__(self, rows: Sequence[Row], prompt_cfg: PromptConfig, strength: float,
                 momentum: float = 0.1, floor: float = 0.05):
        self.classes = {r.id: r.emotion or gold(r, prompt_cfg) for r in rows}
        self.strength, self.momentum, self.floor = strength, momentum, floor
        self.recall: dict[str, float] = {}

    def update(self, results: Sequence[tuple[str, float]]) -> None:
        """(row id, accuracy of its group) for classify groups, in the same order on every process."""
        for rid, acc in results:
            c = self.classes.get(rid)
            if c is None:
                continue
            old = self.recall.get(c)
            self.recall[c] = acc if old is None else (1 - self.momentum) * old + self.momentum * acc

    def class_weights(self) -> dict[str, float]:
        if not self.strength or not self.recall:
            return {}
        raw = {c: max(r, self.floor) ** -self.strength for c, r in self.recall.items()}
        mean = sum(raw.values()) / len(raw)
        return {c: v / mean for c, v in raw.items()}

    def group_weights(self, examples: Sequence[Example]) -> list[float]:
        """One weight per group: its class's weight for classify prompts, 1 otherwise (and for a class
        not seen yet)."""
        w = self.class_weights()
        return [w.get(self.classes.get(e.row.id, ""), 1.0) if e.task == "classify" else 1.0 for e in examples]

    def stats(self) -> dict[str, float]:
        w = self.class_weights()
        return {**{f"classify/recall/{c}": r for c, r in sorted(self.recall.items())},
                **{f"classify/class_weight/{c}": v for c, v in sorted(w.items())}}

    def state_dict(self) -> dict[str, float]:
        return dict(self.recall)

    def load_state_dict(self, s: dict[str, float]) -> None:
        self.recall = {k: float(v) for k, v in s.items()}


# --- one generation batch ---------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """One micro-batch of groups on this process: B prompts x G completions, ready to score."""

    examples: list[Example]  # B
    completions: list[list[int]]  # B*G, group-major
    texts: list[str]
    rewards: torch.Tensor  # (B*G, F), NaN = not applicable
    prompt: dict[str, torch.Tensor]  # prompt_ids, prompt_mask, input_features, feature_attention_mask (B rows)
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


def reward_kwargs(examples: Sequence[Example], G: int, prompt_cfg: PromptConfig, labels: list[str]) -> dict[str, list]:
    """Row fields as per-completion lists (TRL's convention for dataset columns)."""
    kw: dict[str, list] = {"task": [e.task for e in examples for _ in range(G)]}
    for f in REWARD_ROW_FIELDS:
        kw[f] = [getattr(e.row, f, None) for e in examples for _ in range(G)]
    n = len(examples) * G
    kw.update(labels=[list(labels)] * n, target=[prompt_cfg.target] * n, cot=[prompt_cfg.cot] * n,
              transcript_in_prompt=[prompt_cfg.transcript and e.transcript for e in examples for _ in range(G)], prompt_cues=[list(prompt_cfg.cues)] * n)
    return kw


def score_rewards(fns: Mapping[str, Callable], examples: Sequence[Example], texts: list[str], ids: list[list[int]],
                  G: int, prompt_cfg: PromptConfig, labels: list[str]) -> torch.Tensor:
    """(B*G, F) rewards, NaN where a function returned None."""
    prompts = [e.prompt for e in examples for _ in range(G)]
    kw = reward_kwargs(examples, G, prompt_cfg, labels)
    cols = []
    for name, fn in fns.items():
        vals = fn(prompts=prompts, completions=texts, completion_ids=ids, **kw)
        if len(vals) != len(texts):
            raise PallmError(f"reward '{name}' returned {len(vals)} values for {len(texts)} completions (one each expected).")
        cols.append([math.nan if v is None else float(v) for v in vals])
    return torch.tensor(cols, dtype=torch.float32).T.contiguous()


def _gather(accelerator, t: torch.Tensor) -> torch.Tensor:
    return accelerator.gather(t.to(accelerator.device)).cpu() if accelerator.num_processes > 1 else t


def _gather_objects(accelerator, objs: list) -> list:
    if accelerator.num_processes == 1:
        return objs
    from accelerate.utils import gather_object

    return gather_object(objs)


# --- training --------------------------------------------------------------------------------------


def _load_init(init):
    if isinstance(init, (tuple, list)):
        model, processor = init
        return model, processor, "in-memory"
    if init is None:
        raise PallmError("train_grpo needs `init`: the stage-1 checkpoint folder (e.g. runs/x/sft).")
    model, processor = load_pretrained(init)
    return model, processor, str(Path(init).resolve())


def resolve_rewards(names: Sequence[str], extra: Mapping[str, Callable] | None = None) -> dict[str, Callable]:
    """Names -> functions: `extra` first (your own functions), then pallm.rewards' registry."""
    from pallm.rewards import get_reward

    extra = dict(extra or {})
    if len(set(names)) != len(names):
        raise ConfigError(f"reward_funcs lists a reward twice: {list(names)}.")
    return {n: extra[n] if n in extra else get_reward(n) for n in names}


def train_grpo(
    cfg: GRPOConfig,
    prompt_cfg: PromptConfig,
    corpus: str | os.PathLike,
    init: str | os.PathLike | tuple,
    out: str | os.PathLike,
    seed: int = 0,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    *,
    reward_fns: Mapping[str, Callable] | None = None,
    backend: RolloutBackend | None = None,
) -> dict[str, Any]:
    """Stage 2 into the run folder `out`; returns a summary (also in `out/train_summary.json`).

    `init`: the stage-1 checkpoint folder, or a `(model, processor)` pair. `reward_fns` adds
    reward functions by name (TRL signature) to those in `pallm.rewards`; `cfg.reward_funcs`
    picks among both. `backend` replaces the default HFBackend (e.g. vLLM on GPUs). Resumes from
    the newest complete `out/checkpoints/step-N`; refuses a finished run unless `overwrite`.
    `progress(step, steps, metrics)` is called on the main process after every optimizer step.
    """
    t_start = time.perf_counter()
    cfg.check_average()  # before any work: a run too short to write what it is to average
    set_threads(cfg.threads)
    seed = cfg.seed if cfg.seed is not None else seed
    manifest = manifest_path(corpus)
    corpus_dir, out = manifest.parent, Path(out)
    G, B, GA = cfg.num_generations, cfg.per_device_batch_size, cfg.gradient_accumulation_steps

    # --- data and rewards (cheap checks before any model is loaded) ---
    all_rows = read_manifest(manifest)
    try:
        labels = label_set(prompt_cfg, sorted({r.emotion for r in all_rows if r.emotion}))
    except ValueError:
        raise PallmError(f"{manifest}: prompt.target=emotion, but no row has an emotion label.") from None
    train_rows = select_train_rows(all_rows, prompt_cfg, None, seed, where=str(manifest))
    if cfg.use_vllm and prompt_cfg.speaker_norm:
        raise ConfigError("prompt.speaker_norm changes the log-mel features, which vLLM computes itself from the "
                          "waveform: train with grpo.use_vllm=false (the HF backend), or without prompt.speaker_norm.")
    check_cues(train_rows, prompt_cfg, where=str(corpus_dir))
    weights = check_task_weights(cfg.task_weights)
    for task in weights:
        if not any(can_serve(r, task, prompt_cfg) for r in train_rows):
            raise PallmError(f"{manifest}: task_weights gives '{task}' weight {weights[task]}, but no train row can serve it "
                             f"(respond needs a reference reply `response`). Set task_weights.{task}=0.")
    fns = resolve_rewards(cfg.reward_funcs, reward_fns)
    w_rewards = torch.tensor(cfg.reward_weights or [1.0] * len(fns), dtype=torch.float32)
    stream = ExampleStream(train_rows, weights, prompt_cfg, labels, seed)
    sampler = PromptSampler(stream, train_rows, prompt_cfg, labels, cfg.oversample_hard, seed, cfg.conflict_share,
                            cfg.transcript_dropout)
    class_recall = ClassRecall(train_rows, prompt_cfg, cfg.class_balance)
    # Its own stream (another seed), read at a position that is a function of the step: resumes exactly.
    ptx_stream = ExampleStream(train_rows, weights, prompt_cfg, labels, seed + 1) if cfg.ptx_coef > 0 else None

    accelerator = make_accelerator(1, cfg.mixed_precision)  # accumulation is done here (loss normalisers differ)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if is_sharded(accelerator):
        raise PallmError("GRPO runs single-process or under DDP (accelerate launch --multi_gpu); FSDP/DeepSpeed are not "
                         "supported (generation needs the whole model on every process). Use LoRA for large models.")
    dev_rows = select_dev_rows(all_rows, prompt_cfg, cfg.eval_rows, seed) if cfg.eval_every else []

    # --- run folder ---
    finished = (out / PALLM_META_FILE).exists()
    accelerator.wait_for_everyone()
    if finished and not overwrite:
        raise PallmError(f"{out}: holds a finished run (pallm.json). Choose another output folder, "
                         "or pass overwrite=True (--overwrite) to replace it.")
    if overwrite and main:
        clear_run(out)
    accelerator.wait_for_everyone()
    resume = latest_checkpoint(out)

    # --- model, reference, optimizer ---
    seed_everything(seed)
    model, processor, init_name = _load_init(init)
    init_meta = read_pallm_meta(init) if init_name != "in-memory" else {}
    if cfg.freeze_audio_encoder:
        freeze_audio_encoder(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    # No dropout: it would make the log-probs of the update differ from those of the sampling
    # policy (TRL: disable_dropout). Eval mode does that, and gradients flow in it all the same;
    # gradient checkpointing only acts in train mode, so there dropout is zeroed instead.
    if cfg.gradient_checkpointing:
        disable_dropout(model)
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval()
    model.config.use_cache = False
    ref_scorer = None
    if cfg.beta > 0 and not is_peft(model):  # PEFT: the reference is the same model with adapters disabled
        ref = copy.deepcopy(model).requires_grad_(False).eval()
        ref_scorer = PolicyScorer(ref, cfg.temperature).to(accelerator.device)
    scorer = PolicyScorer(model, cfg.temperature)
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.steps, cfg.warmup_ratio)
    scorer, optimizer, scheduler = accelerator.prepare(scorer, optimizer, scheduler)
    policy = accelerator.unwrap_model(scorer).policy
    if backend is None and cfg.use_vllm:
        from pallm.train.rollout_vllm import VLLMBackend

        backend = VLLMBackend.for_grpo(cfg, init_name, policy, processor, accelerator, seed * 1009 + rank,
                                       audios_per_prompt=2 if prompt_cfg.speaker_reference else 1)
    rollout = backend or HFBackend(policy, processor)
    rollout.sync_weights(policy)
    stop_ids, pad_id = stop_token_ids(processor), pad_token_id(processor.tokenizer)

    fingerprint = {"seed": seed, "num_processes": world, "prompt": prompt_cfg.model_dump(mode="json"), "init": init_name,
                   "train_rows": len(train_rows), **{k: cfg.model_dump(mode="json")[k] for k in _RESUME_KEYS}}
    step = 0
    if resume is not None:
        saved = json.loads((resume[1] / "trainer_state.json").read_text(encoding="utf-8"))
        check_resume(saved, fingerprint, resume[1])
        state = load_training_checkpoint(accelerator, resume[1])
        step = int(state["step"])
        sampler.load_state_dict(state["sampler"])
        class_recall.load_state_dict(state.get("class_recall", {}))
        rollout.sync_weights(policy)
    else:
        # Different sampling noise per process (the same stream would correlate the groups).
        torch.manual_seed(seed * 1009 + rank)
    start_step = step

    meta = {"stage": "grpo", "task_format": prompt_cfg.model_dump(mode="json"), "labels": labels,
            "train_config": cfg.model_dump(mode="json"), "corpus": str(corpus_dir.resolve()), "seed": seed,
            "init": init_name, "init_stage": init_meta.get("stage"), "train_rows": len(train_rows)}
    cache = AudioCache(cfg.audio_cache)
    logger = RunLogger(out, enabled=main, resume_step=step)
    dev_curve = read_dev_curve(out, step) if (main and resume is not None) else []
    best = cfg.best_model_tracker(out, step if resume is not None else None)
    device = accelerator.device
    task_ids = {t: i for i, t in enumerate(TASKS)}
    totals = {"generate": 0.0, "reward": 0.0, "score": 0.0, "backward": 0.0, "tokens": 0, "completions": 0}
    history: list[dict[str, Any]] = []

    def unwrapped_scorer() -> PolicyScorer:
        return accelerator.unwrap_model(scorer)

    def heard(examples: list[Example]) -> list:
        """What the model hears for each prompt (its clip, or speaker reference + clip), decoded once."""
        return [model_audio(e.row, prompt_cfg, cache.get, cache.get) for e in examples]

    def audio_and_prompts(examples: list[Example]) -> tuple[list, list[str]]:
        return heard(examples), [e.prompt for e in examples]

    def encode_prompts(audios: list, prompts: list[str]):
        """Prompt inputs, once per prompt (the scorer shares them across the group)."""
        return encode_batch(processor, audios, prompts, padding_side="left")

    def prompt_tensors(enc) -> dict[str, torch.Tensor]:
        return {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"],
                "input_features": enc["input_features"], "feature_attention_mask": enc["feature_attention_mask"]}

    # Our own backend encodes prompts exactly as `encode_prompts` does: it is handed that encoding, so
    # features and chat templates are made once per step, not once for sampling and once for the update.
    share_encoding = isinstance(rollout, HFBackend) and rollout.system is None and rollout.max_audio_seconds is None

    def sample(examples: list[Example]):
        """Completions, their texts and rewards, and the prompts' encoding (for the update)."""
        t0 = time.perf_counter()
        audios, prompts = audio_and_prompts(examples)
        enc = encode_prompts(audios, prompts)
        share = {"prompt_inputs": enc} if share_encoding else {}
        with accelerator.autocast():  # sample at the precision the update computes log-probs in
            ids = rollout.generate(audios, prompts, G,
                                   cfg.temperature, cfg.top_p, cfg.max_completion_length, **share)
        ids = cut_at_stop(ids, stop_ids)
        t1 = time.perf_counter()
        texts = processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
        rewards = score_rewards(fns, examples, texts, ids, G, prompt_cfg, labels)
        return ids, texts, rewards, enc, t1 - t0, time.perf_counter() - t1

    def group_zero_var(rewards: torch.Tensor) -> list[int]:
        return [i for i, z in enumerate(compute_advantages(rewards, w_rewards, G)[2].tolist()) if z]

    def generation_round() -> tuple[list[MicroBatch], dict[str, Any]]:
        """GA micro-batches of fresh groups on this process, advantages computed over all processes."""
        micro: list[MicroBatch] = []
        t = {"generate": 0.0, "reward": 0.0, "score": 0.0}
        zero_first, refilled = 0, 0
        for _ in range(GA):
            examples = sampler.draw(B * world)[rank * B:(rank + 1) * B]
            ids, texts, rewards, enc, tg, tr = sample(examples)
            t["generate"] += tg
            t["reward"] += tr
            zero = group_zero_var(rewards)
            zero_first += len(zero)
            for _try in range(cfg.dynamic_sampling_max_tries if cfg.dynamic_sampling else 0):
                counts = _gather(accelerator, torch.tensor([len(zero)], device=device)).tolist()
                if sum(counts) == 0:
                    break
                fresh = sampler.draw(sum(counts))  # same draws on every process; each takes its share
                mine = fresh[sum(counts[:rank]): sum(counts[:rank]) + len(zero)]
                if mine:
                    n_ids, n_texts, n_rewards, _, tg, tr = sample(mine)
                    t["generate"] += tg
                    t["reward"] += tr
                    for k, (gi, ex) in enumerate(zip(zero, mine)):
                        examples[gi] = ex
                        sl = slice(gi * G, (gi + 1) * G)
                        ids[sl], texts[sl] = n_ids[k * G:(k + 1) * G], n_texts[k * G:(k + 1) * G]
                        rewards[sl] = n_rewards[k * G:(k + 1) * G]
                    refilled += len(mine)
                    enc = None  # some prompts were replaced
                zero = group_zero_var(rewards)
            c_ids, c_mask = completion_tensors(ids, pad_id)
            enc = enc if enc is not None else encode_prompts(*audio_and_prompts(examples))
            micro.append(MicroBatch(examples, ids, texts, rewards, prompt_tensors(enc), c_ids, c_mask))

        # Batch-level statistics need every process's rewards; groups never straddle processes.
        local = torch.cat([m.rewards for m in micro])
        everyone = _gather(accelerator, local)
        adv, total, zero_var = compute_advantages(everyone, w_rewards, G, cfg.scale_rewards, cfg.multi_objective_aggregation)
        mine = adv[rank * len(local):(rank + 1) * len(local)].split(B * G)
        for m, a in zip(micro, mine):
            m.advantages = a * torch.tensor(class_recall.group_weights(m.examples)).repeat_interleave(G)

        # Old log-probs (num_iterations > 1) and the reference's, before any update of this round.
        t0 = time.perf_counter()
        if cfg.num_iterations > 1 or cfg.beta > 0:
            with torch.no_grad(), accelerator.autocast():  # the unwrapped scorer has no autocast of its own
                for m in micro:
                    inputs = _inputs(m)
                    if cfg.num_iterations > 1:
                        m.old_logp = unwrapped_scorer()(**inputs, with_entropy=False)[0]
                    if cfg.beta > 0:
                        if ref_scorer is not None:
                            m.ref_logp = ref_scorer(**inputs, with_entropy=False)[0]
                        else:
                            with unwrapped_scorer().policy.disable_adapter():
                                m.ref_logp = unwrapped_scorer()(**inputs, with_entropy=False)[0]
        t["score"] = time.perf_counter() - t0

        stats, results = rollout_stats(micro, total, zero_var, zero_first, refilled)
        results = _gather_objects(accelerator, results)
        sampler.update(results)  # every process updates the same pool
        class_recall.update(results)
        stats.update(class_recall.stats())
        stats.update({f"time/{k}": v for k, v in t.items()})
        return micro, stats

    def rollout_stats(micro: list[MicroBatch], total_all: torch.Tensor, zero_var_all: torch.Tensor,
                      zero_first: int, refilled: int) -> tuple[dict[str, Any], list[tuple[str, float]]]:
        """Per-function and per-task reward means, accuracy, parse rate, lengths, zero-variance share,
        over all processes (each row: task, correct, format_ok, length, rewards); and the accuracy
        of every classify group (for oversample_hard)."""
        rows = []
        results = []  # (row id, group accuracy) of classify groups, for oversample_hard
        for m in micro:
            for gi, ex in enumerate(m.examples):
                correct_g = []
                for k in range(G):
                    i = gi * G + k
                    p = parse_completion(m.texts[i], ex.task, labels, cot=prompt_cfg.cot)
                    correct = float(p.label == gold(ex.row, prompt_cfg)) if ex.task == "classify" else math.nan
                    correct_g.append(correct)
                    rows.append([task_ids[ex.task], correct, float(p.format_ok), len(m.completions[i]), *m.rewards[i].tolist()])
                if ex.task == "classify":
                    results.append((ex.row.id, float(np.mean(correct_g))))
        table = _gather(accelerator, torch.tensor(rows, dtype=torch.float64))
        table = torch.cat([table, total_all.double().unsqueeze(1)], 1)
        s: dict[str, Any] = {"zero_var_frac": zero_var_all.float().mean().item(),
                             "zero_var_frac_sampled": float(_gather(accelerator, torch.tensor([zero_first], device=device)).sum()) / len(zero_var_all),
                             "refilled_groups": int(_gather(accelerator, torch.tensor([refilled], device=device)).sum())}
        totals["tokens"] += int(table[:, 3].sum())
        totals["completions"] += len(table)
        for prefix, sel in [("", torch.ones(len(table), dtype=torch.bool))] + [
                (f"{t}/", table[:, 0] == i) for t, i in task_ids.items() if t in weights]:
            part = table[sel]
            if len(part) == 0:
                continue
            s[f"{prefix}reward"] = _nanmean(part[:, -1])
            for j, name in enumerate(fns):
                v = _nanmean(part[:, 4 + j])
                if v is not None:
                    s[f"{prefix}rewards/{name}"] = v
            if prefix != "respond/":
                acc = _nanmean(part[:, 1])
                if acc is not None:
                    s[f"{prefix}accuracy"] = acc
            s[f"{prefix}parse_rate"] = float(part[:, 2].mean())
            s[f"{prefix}completion_length"] = float(part[:, 3].mean())
        return s, results

    def _inputs(m: MicroBatch) -> dict[str, torch.Tensor]:
        return {**{k: v.to(device) for k, v in m.prompt.items()},
                "completion_ids": m.completion_ids.to(device), "completion_mask": m.completion_mask.to(device)}

    def optimisation_pass(micro: list[MicroBatch]) -> dict[str, Any]:
        """One optimizer step over the round's micro-batches (gradient accumulation)."""
        t0 = time.perf_counter()
        n_tokens = float(_gather(accelerator, torch.tensor([float(sum(m.completion_mask.sum() for m in micro))],
                                                           device=device)).sum())
        agg = torch.zeros(4, len(task_ids), dtype=torch.float64)  # tokens, entropy, kl, clipped per task
        loss_sum = 0.0
        ptx = None
        if ptx_stream is not None:
            P = cfg.ptx_batch_size
            chunk = ptx_stream.take(step * P * world, P * world)[rank * P:(rank + 1) * P]
            c_ids, c_mask = completion_tensors(
                [processor.tokenizer(e.target + family_of(processor).end_of_turn, add_special_tokens=False)["input_ids"]
                 for e in chunk], pad_id)
            inputs = {**{k: v.to(device) for k, v in prompt_tensors(encode_prompts(*audio_and_prompts(chunk))).items()},
                      "completion_ids": c_ids.to(device), "completion_mask": c_mask.to(device)}
            with accelerator.no_sync(scorer):  # the RL pass's last backward all-reduces both
                logp, _ = scorer(**inputs, with_entropy=False)
                ptx = -(logp * inputs["completion_mask"]).sum() / inputs["completion_mask"].sum()
                accelerator.backward(cfg.ptx_coef * ptx)
        for j, m in enumerate(micro):
            inputs = _inputs(m)
            mask = inputs["completion_mask"]
            sync = nullcontext() if j == len(micro) - 1 else accelerator.no_sync(scorer)
            with sync:
                logp, entropy = scorer(**inputs)
                old = logp.detach() if m.old_logp is None else m.old_logp
                per_token, clipped = clipped_objective(logp, old, m.advantages.to(device), cfg.epsilon_low, cfg.epsilon_hi)
                kl = None
                if cfg.beta > 0:
                    kl = k3_kl(logp, m.ref_logp)
                    per_token = per_token + cfg.beta * kl
                if cfg.loss_type == "dapo":  # token mean over the whole generation batch (all processes)
                    loss = aggregate_loss(per_token, mask, "dapo", cfg.max_completion_length, n_tokens / world)
                else:
                    loss = aggregate_loss(per_token, mask, cfg.loss_type, cfg.max_completion_length) / len(micro)
                accelerator.backward(loss)
            loss_sum += float(loss.detach())
            maskf = mask.double()
            task_col = torch.tensor([task_ids[e.task] for e in m.examples for _ in range(G)])
            for name_i, vals in enumerate([maskf, entropy.detach().double() * maskf,
                                           (kl.detach().double() if kl is not None else torch.zeros_like(maskf)) * maskf,
                                           clipped.double() * maskf]):
                agg[name_i].index_add_(0, task_col, vals.sum(-1).cpu())
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        rollout.sync_weights(policy)
        agg = _gather(accelerator, agg.unsqueeze(0)).sum(0)
        s: dict[str, Any] = {"loss": float(_gather(accelerator, torch.tensor([loss_sum], device=device)).mean()),
                             "lr": scheduler.get_last_lr()[0]}
        if ptx is not None:
            s["ptx_nll"] = float(_gather(accelerator, ptx.detach().reshape(1)).mean())
        if grad_norm is not None:
            s["grad_norm"] = grad_norm
        for prefix, cols in [("", slice(None))] + [(f"{t}/", slice(i, i + 1)) for t, i in task_ids.items() if t in weights]:
            tok = float(agg[0, cols].sum())
            if tok == 0:
                continue
            s[f"{prefix}entropy"] = float(agg[1, cols].sum()) / tok
            s[f"{prefix}clip_frac"] = float(agg[3, cols].sum()) / tok
            if cfg.beta > 0:
                s[f"{prefix}kl"] = float(agg[2, cols].sum()) / tok
        s["time/backward"] = time.perf_counter() - t0
        return s

    def dev_eval(at: int) -> None:
        from pallm.evaluate.metrics import classification_metrics
        from pallm.evaluate.predict import predict

        rec = None
        if main:
            was_training = policy.training
            preds = predict(policy, processor, dev_rows, "classify", prompt_cfg, labels, batch_size=cfg.eval_batch_size,
                            max_new_tokens=cfg.max_completion_length, audio_fn=cache.get, reference_fn=cache.get)
            policy.train(was_training)
            rec = dev_record(at, classification_metrics(preds, dev_rows, labels))
            dev_curve.append(rec)
            logger.log(at, {k: v for k, v in rec.items() if k != "step"}, kind="dev")
        accelerator.wait_for_everyone()
        if best is not None:
            best.update(accelerator, policy, processor, {**meta, "step": at}, rec)

    window: dict[str, list[float]] = {}
    last_saved = step
    try:
        while step < cfg.steps:
            t_round = time.perf_counter()
            micro, rstats = generation_round()
            for it in range(cfg.num_iterations):
                if step >= cfg.steps:
                    break
                t_step = time.perf_counter()
                metrics = optimisation_pass(micro)
                step += 1
                if it == 0:
                    metrics.update(rstats)
                    wall = time.perf_counter() - t_round
                else:
                    wall = time.perf_counter() - t_step
                metrics["examples_per_s"] = B * G * GA * world / wall
                metrics["rollout_tokens_per_s"] = (rstats.get("completion_length", 0) * B * G * GA * world
                                                    / max(rstats["time/generate"], 1e-9)) if it == 0 else None
                for k in ("generate", "reward", "score", "backward"):
                    totals[k] += metrics.get(f"time/{k}", 0.0)
                metrics = {k: v for k, v in metrics.items() if v is not None}
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    logged = {k: float(np.mean(v)) for k, v in window.items()}
                    logger.log(step, logged)
                    history.append({"step": step, **logged})
                    window.clear()
                if main and progress is not None:
                    progress(step, cfg.steps, metrics)
                if dev_rows and (step % cfg.eval_every == 0 or step == cfg.steps):
                    dev_eval(step)
            # Checkpoints at generation-batch boundaries only: nothing but the small sampler state
            # then needs saving besides what accelerate saves (weights, optimizer, scheduler, RNGs).
            if cfg.save_every and (step // cfg.save_every > last_saved // cfg.save_every or cfg.saves_step(step)):
                save_training_checkpoint(accelerator, policy, processor, out, step, {**meta, "step": step},
                                         {"steps": cfg.steps, "sampler": sampler.state_dict(), "class_recall": class_recall.state_dict(),
                                          "fingerprint": fingerprint},
                                         keep=cfg.keep_checkpoints)
                last_saved = step

        wall = time.perf_counter() - t_start
        # Rollout metrics appear on the first step of each generation batch: take each key's latest.
        first, final = (history[0] if history else {}), {}
        for rec in history:
            final.update(rec)
        train_time = sum(totals[k] for k in ("generate", "reward", "score", "backward"))
        summary = {
            "steps": step,
            "resumed_from": start_step if resume is not None else None,
            "first_reward": first.get("reward"),
            "final_reward": final.get("reward"),
            "final": {k: v for k, v in final.items() if k != "step"},
            "completions": totals["completions"],
            "examples_per_s": totals["completions"] / train_time if train_time else None,
            "rollout_tokens_per_s": totals["tokens"] / totals["generate"] if totals["generate"] else None,
            "time_s": {k: round(totals[k], 2) for k in ("generate", "reward", "score", "backward")},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "wall_time_s": round(wall, 2),
            "train_rows": len(train_rows),
            "trainable_parameters": trainable_parameters(policy),
            "processes": world,
            "threads": torch.get_num_threads(),  # per process
            "dev_curve": dev_curve,
        }
        return finish_run(accelerator, policy, processor, out, meta, summary, ("dev_curve", "final"), best=best,
                          average_last=cfg.average_last_checkpoints)
    finally:
        logger.close()


def _nanmean(x: torch.Tensor) -> float | None:
    v = x[~torch.isnan(x)]
    return float(v.mean()) if len(v) else None


__all__ = [
    "ClassRecall",
    "GRPOConfig",
    "MicroBatch",
    "PolicyScorer",
    "PromptSampler",
    "aggregate_loss",
    "clipped_objective",
    "completion_tensors",
    "compute_advantages",
    "k3_kl",
    "nanstd",
    "resolve_rewards",
    "score_rewards",
    "train_grpo",
    "weighted_total",
]
