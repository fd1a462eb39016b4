"""Processes on this machine: `deploy` (SuperLink, sites, ServerApp), `simulate`, a standalone `site`, the Fleet gate."""
