"""Training utilities (EMA, ...); the Lightning module and data wiring live elsewhere."""
