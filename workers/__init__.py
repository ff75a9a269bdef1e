"""workers: one process per node. The node's profile and its measurement (profile.py), the shard it
loads (shard.py) and the stage of layers it runs (llama_stage.py), its MoE experts and their tiers
(moe.py, with residency.py deciding what is resident), the route statistics it writes to Redis
(route_stats.py), the validation of incoming steps (steps.py), the wire encoding (wire.py) and the
gRPC WorkerService (server.py). Imports quant and protos, never orchestrator."""
