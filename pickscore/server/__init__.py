"""The gRPC scoring server: settings, batcher, backends, caches, metrics, services and app wiring."""
