"""Running it: the service tree, run_processes, the twistd options, the console script, workers,
logging."""
