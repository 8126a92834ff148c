"""Scheduler: jobs, control, the daemon, its API and the CLI."""
