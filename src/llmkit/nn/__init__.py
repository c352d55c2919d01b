"""Building blocks, one concept per module. Variants are registry entries selected by config."""
