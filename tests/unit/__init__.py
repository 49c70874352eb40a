"""Tests that need no cluster: `make unit`."""
