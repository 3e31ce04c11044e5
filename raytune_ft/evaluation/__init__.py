"""Evaluation of an exported model in the conditions it will meet: `raytune-ft eval EXPORT DATA`."""

from raytune_ft.evaluation.runner import EVAL_FILE, EvalRequest, evaluate_export, lm_perplexity

__all__ = ["EVAL_FILE", "EvalRequest", "evaluate_export", "lm_perplexity"]
