"""Prefect flows around the stages."""
