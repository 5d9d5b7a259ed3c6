"""The only place Ray and MLflow are imported."""
