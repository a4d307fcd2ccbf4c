"""Running stages: queues, workers, the runner and the pipeline file."""
