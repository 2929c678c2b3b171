"""Prefect flows: partition, train, evaluate and the whole pipeline."""
