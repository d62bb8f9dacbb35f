"""Quality: `kvrelay eval` (held-out quality and prefill time of the plans the selector serves) and the
per-family reports. The metrics, evaluation datasets, cases and quality target it scores with are the
profiler's (kvrelay.profiler.scores, evaldata, cases, target), one layer down."""
