"""Evaluation: accuracy, pass@k, token counts, breakdowns, reports."""
