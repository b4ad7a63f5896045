"""Turning a config into processes on 1..N nodes."""
