"""The architecture lab: small methods tested on tiny transformers trained from scratch.

Attention variants (SSA, CAT) live in `thinkling.models.attention` and are
picked by a recipe's `model.tiny.attention`; the lab's own methods are CoT2
(`cot2`) and test-time training (`ttt`). Each experiment is a module of
`thinkling.lab.experiments`, run by `thinkling lab run <name> [--quick] [--out DIR]`, writing a
plot and a table into `runs/lab/<name>/`.
"""

# name -> (what it shows, the module under thinkling.lab.experiments that runs it)
EXPERIMENTS = {
    "cat-recall-copying": (
        "one attention layer vs one CAT layer on associative recall and selective copying, trained at n, tested at n..4n",
        "cat_recall_copying",
    ),
    "ssa-context": (
        "standard attention vs SSA (same size and steps) on chain arithmetic across context lengths k = 2..10",
        "ssa_context",
    ),
    "cot2-mnns": (
        "CoT2 (CSFT) vs discrete CoT on mnns over embedding dims 16/24/32, pass@k, then GRPO with multi-token sampling",
        "cot2_mnns",
    ),
    "ttt-regression": (
        "test-time training vs plain in-context prediction on linear regression, with and without task shift",
        "ttt_regression",
    ),
}
