"""keras_vmoe."""
