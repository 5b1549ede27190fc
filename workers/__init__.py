"""The worker process: registers workflows and activities. Run with `python -m workers`."""
