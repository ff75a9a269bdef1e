"""Wire format edgeweave.v1 (the runtime issue)."""
