"""Shared pytest configuration."""

pytest_plugins = ["tests._real_cluster"]  # the real multi-process cluster fixture
