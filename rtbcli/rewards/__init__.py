"""Rewards for fine-tuning toward real-data targets, computed from classifiers shipped with the package."""
