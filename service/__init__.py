"""HTTP model serving of VPD-SR: FastAPI app, dynamic batching engine, hardened image I/O, metrics."""
