"""The experiment grid: cells and their ids, choices on inner splits, racing and halving, the runner and
the Ray executor."""
