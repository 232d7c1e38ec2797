"""`tunery serve`: an OpenAI-compatible fine-tuning service. This package never imports torch: training
runs through the CLI in worker processes, and inference in `python -m tunery.server.inference`."""
