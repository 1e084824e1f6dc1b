"""The host-side half of the method: tasks (inputs, prompts, answer parsers), System 2 programs, filters."""
