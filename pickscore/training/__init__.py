"""Training: Pick-a-Pic data (real and synthetic), loss, metrics."""
