"""Probe contrast data shipped with safetylock: response templates and recipes (see README.md here)."""
