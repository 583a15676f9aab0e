"""Speed benchmarks: ratios measured within one run (see BENCHMARKS.md), never timed unit tests."""
