"""Generated from proto/pickscore/v1/scoring.proto by `make proto`; never edit by hand."""
