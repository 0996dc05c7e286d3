"""A minimal third-party aha backend, kept as a worked example and a test of the plugin path."""
