"""`make bench`: InfluenceEmbedder against Captum and kronfluence (see benchmarks/run.py)."""
