"""Offline DroidSpeak profiler: score contiguous recompute groups of a (sender, receiver) pair."""
