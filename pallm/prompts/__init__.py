"""The two tasks' prompts, their chain-of-thought targets, and the one output parser."""

from pallm.prompts.format import (
    CUE_PHRASES,
    TASKS,
    Parsed,
    PromptConfig,
    build_prompt,
    build_target,
    parse_completion,
)

__all__ = ["CUE_PHRASES", "TASKS", "Parsed", "PromptConfig", "build_prompt", "build_target", "parse_completion"]
