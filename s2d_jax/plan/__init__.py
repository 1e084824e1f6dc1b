"""Planning a run before renting chips: per-device memory and FLOPs estimated from shapes (`estimate`) and every device program compiled ahead of time for a TPU or GPU (`aot`, `aot_programs`)."""
