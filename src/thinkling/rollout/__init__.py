"""Generation for training and evaluation: prompts, groups, BREAD branching, stopping control."""
