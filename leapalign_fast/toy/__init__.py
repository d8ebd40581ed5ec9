"""Toy-scale alignment benchmark: procedural captioned scenes in GenEval's categories and an exact evaluator."""
