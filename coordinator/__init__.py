"""The Phalanx coordinator: `python -m coordinator`.

It serves CoordinatorService (trainers register and keep a heartbeat), runs the federated rounds
(sample, broadcast, collect with a deadline, validate, aggregate, evaluate, checkpoint), and
writes the run's outputs.
"""
