"""Training objectives: the recommendation loss, and the Pareto weighting of (L_rec, a_cd)."""
