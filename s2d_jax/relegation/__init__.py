"""Relegation: routers that keep System 1 where it is sure (`routing`), rounds over fresh slices of the pool (`rounds`) and their report (`report`)."""
