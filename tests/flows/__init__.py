"""Tests of flows/: the CLI, the Prefect flow end to end, schedules, history, the report."""
