"""Makes tests/ importable (tiny_models) from unit and integration tests alike."""
