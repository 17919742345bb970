"""Slice-discovery benchmarks: metrics (dcbench's definitions), the real dcbench, the offline mini-dcbench."""
