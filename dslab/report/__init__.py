"""Run files, latency histograms, SLO evaluation and the reports built on them."""
