"""Hyperparameter sweeps over ``fit`` (Optuna): the search space, one trial, the study and its table."""
