"""The architecture lab: small methods tested on tiny transformers trained from scratch.

Attention variants (SSA, CAT) live in `thinkling.models.attention` and are
picked by a recipe's `model.tiny.attention`; the lab's own methods are CoT2
(`cot2`) and test-time training (`ttt`). Each experiment is one script under
`experiments/lab/` writing a plot and a table into `runs/lab/<name>/`.
"""

# name -> (what it shows, the command that runs it; add --quick for a one-minute smoke run)
EXPERIMENTS = {
    "cat-recall-copying": (
        "one attention layer vs one CAT layer on associative recall and selective copying, trained at n, tested at n..4n",
        "python experiments/lab/cat_recall_copying.py",
    ),
    "ssa-context": (
        "standard attention vs SSA (same size and steps) on chain arithmetic across context lengths k = 2..10",
        "python experiments/lab/ssa_context.py",
    ),
    "cot2-mnns": (
        "CoT2 (CSFT) vs discrete CoT on mnns over embedding dims 16/24/32, pass@k, then GRPO with multi-token sampling",
        "python experiments/lab/cot2_mnns.py",
    ),
    "ttt-regression": (
        "test-time training vs plain in-context prediction on linear regression, with and without task shift",
        "python experiments/lab/ttt_regression.py",
    ),
}
