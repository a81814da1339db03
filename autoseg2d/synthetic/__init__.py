"""Synthetic head CT generators: head_ct (the demo's and the tests' cases), anatomy and hard (the benchmarks'
harder cases, with partial volume and small bleeds)."""
