"""Trainers: SFT, the RL loop, staged pipelines."""
