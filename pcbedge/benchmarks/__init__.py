"""Accuracy metrics, latency statistics and the HTML benchmark report (numpy + stdlib + Pillow)."""
