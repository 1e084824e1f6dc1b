"""Relegation: routers that keep System 1 where it is sure (`routing`; learned ones: `probe`, a classifier on its
hidden states, and `marker`, a model taught to ask for System 2), rounds over fresh slices of the pool (`rounds`)
and their report (`report`)."""
