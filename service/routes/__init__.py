"""The HTTP API, one router per concern: upscaling, the model registry, health and metrics."""
