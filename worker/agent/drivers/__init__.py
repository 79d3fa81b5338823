"""Container drivers: docker for real work, fake for tests of scheduling logic."""
