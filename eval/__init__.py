"""Evaluation helpers: classification metrics, confusion-matrix plots and run comparison."""
