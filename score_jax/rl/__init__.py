"""Training: SCoRe objectives, log-probs, the pure train step, modes, rollouts and the one loop."""
