"""Generic utilities: argument checks and atomic file writes."""
