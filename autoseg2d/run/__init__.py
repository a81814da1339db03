"""What the stages share: the run's context and profile, the work dir, training bundles, the shared queue,
the clock, stored fold maps and loaded models."""
