"""tickwave CLI, settings and the all-in-one launcher."""
