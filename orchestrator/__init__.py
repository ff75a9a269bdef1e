"""Orchestrator: the edgeweave command line (placement and the Ray controller come with the runtime issue)."""
