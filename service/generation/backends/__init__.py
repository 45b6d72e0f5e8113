"""One module per generator backend; ``service.generation.registry`` builds them by name."""
