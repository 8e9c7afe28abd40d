"""Local development host: runs the product against the embedded twin (tests and demo only)."""
