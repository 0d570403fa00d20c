"""The scoring server: settings, engine, batchers, caches, metrics, the gRPC services, the HTTP front door, app."""
