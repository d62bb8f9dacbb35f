"""Quality: task and agreement scores, the evaluation datasets, and `kvrelay eval`."""
