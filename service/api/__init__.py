"""HTTP layer: routes translate between JSON and the scoring/baseline layers."""
