"""What operators run around a job: the preflight doctor, cluster manifests, run comparison,
benchmarks, the decode check."""
