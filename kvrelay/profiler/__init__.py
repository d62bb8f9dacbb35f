"""Offline DroidSpeak profiler: score contiguous recompute groups of a (sender, receiver) pair.

With what it scores by: the quality metrics (scores), the evaluation datasets (evaldata), the
teacher-forced cases (cases) and the quality target a plan must meet (target), which `kvrelay eval`,
the load tests' quality check and the reports read too."""
