"""Prefect tasks: thin wrappers that call fedmef_core, persist outputs and log to MLflow."""
