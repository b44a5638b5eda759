"""The HTTP service around a loaded predictor (FastAPI + uvicorn)."""
