"""Phalanx: federated fine-tuning where only LoRA adapters leave a site.

This package holds what the coordinator and the trainers share: the generated wire stubs
(`phalanx.v1`), the adapter codec, the model definition, data loading and partitioning,
gRPC channel and server construction, and telemetry set-up.
"""
