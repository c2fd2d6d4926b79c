"""Locust load tests with exact percentiles, and the baselines they are compared against."""
