"""Fine-tuning jobs: the SQLite store, file storage, training-data validation, the worker process."""
