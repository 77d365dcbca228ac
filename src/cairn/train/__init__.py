"""Training: the one loop (``loop.py``), objectives that plug into it, optimizer and schedule, checkpoints and
metrics, and parallelism applied from outside the model (``distributed.py``)."""
