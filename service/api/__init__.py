"""HTTP controllers, one per area; each handler raises domain errors and never builds error bodies."""
