"""The only place Ray and MLflow are imported."""

import logging

# faiss logs at INFO which of its builds it loads (8 lines per process). Ray Train's workers show INFO logs, and
# they import faiss (fssmeta.models.memory) when they unpickle the training loop, before any of its code runs.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
