"""Telemetry: reads GPUs through a backend and keeps the readings in a SQL store."""
