"""Data: tasks (problems, prompts, rewards), the grain prompt pipeline, seqio, the toy task."""
