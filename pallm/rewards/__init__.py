"""Stage-2 (GRPO) rewards: plain functions with TRL's signature, looked up by name.

    fn(prompts, completions, **row_fields) -> list[float | None]     # None: not this row's task

`REWARDS` maps names to functions; `get_reward(name)` fetches one; `@register(name)` adds one.
See docs/rewards.md for each reward's definition.
"""

from pallm.rewards.core import (
    EMOTION_VA,
    REWARDS,
    completion_text,
    column,
    cue_claims,
    emotion_similarity,
    get_reward,
    make_cue_grounding,
    make_emotion_accuracy,
    make_length_penalty,
    make_repetition_penalty,
    register,
)
from pallm.rewards.judge import LEXICON, judge_reply, make_llm_judge, parse_judge_score

__all__ = [
    "EMOTION_VA",
    "LEXICON",
    "REWARDS",
    "completion_text",
    "column",
    "cue_claims",
    "emotion_similarity",
    "get_reward",
    "judge_reply",
    "make_cue_grounding",
    "make_emotion_accuracy",
    "make_length_penalty",
    "make_llm_judge",
    "make_repetition_penalty",
    "parse_judge_score",
    "register",
]
