"""The coordinator's live web dashboard: runs, rounds, charts and sites, pushed to the page as they change."""

from coordinator.dashboard.server import Dashboard, dashboard_access
from coordinator.dashboard.sources import LocalRuns, RunSource, ServedRuns

__all__ = ["Dashboard", "LocalRuns", "RunSource", "ServedRuns", "dashboard_access"]
