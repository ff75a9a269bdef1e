"""orchestrator: the top floor. The placement (planner.py, pure), the Ray controller that starts the
workers, watches their health and recovers (controller.py), the engine that batches sessions into
steps and sends them down the stages (engine.py, streams.py), the InferenceService (service.py), the
MoE simulator (experts.py, moesim.py), the Redis server (redis_server.py) and the `edgeweave`
command (cli.py). Imports everything below it."""
