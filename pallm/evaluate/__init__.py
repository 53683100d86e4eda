"""Evaluation: predictions, metrics split by word/voice agreement, lexical-shortcut probes and
no-LLM baselines. Output shapes: CONTRACT.md, "Evaluation output".

    preds = predict(model, processor, rows, "classify", prompt_cfg)
    metrics = classification_metrics(preds, rows, labels)         # subsets all / congruent / conflict ...
    metrics["probes"] = shortcut_probes(model, processor, rows, prompt_cfg, real=preds)
    write_eval(out_dir, model_name, data_name, metrics, preds)    # metrics.json + predictions.jsonl
"""

from pallm.evaluate.predict import Prediction, gold_label, predict, row_audio, to_prediction
from pallm.evaluate.metrics import (
    AFFECT_WORDS,
    UNPARSED,
    acknowledges_affect,
    classification_metrics,
    distinct_n,
    fold_metrics,
    follows_words_rate,
    response_metrics,
    write_eval,
)
from pallm.evaluate.probes import same_words_partners, shortcut_probes, silence_like
from pallm.evaluate.baselines import acoustic_baseline, speaker_normalise, text_baseline

__all__ = [
    "AFFECT_WORDS",
    "UNPARSED",
    "Prediction",
    "acknowledges_affect",
    "acoustic_baseline",
    "classification_metrics",
    "distinct_n",
    "fold_metrics",
    "follows_words_rate",
    "gold_label",
    "predict",
    "response_metrics",
    "row_audio",
    "same_words_partners",
    "shortcut_probes",
    "silence_like",
    "speaker_normalise",
    "text_baseline",
    "to_prediction",
    "write_eval",
]
