"""Provider registry, effective-config resolution, masking and validation."""
