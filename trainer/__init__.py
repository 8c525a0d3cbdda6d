"""A Phalanx site: `python -m trainer --partition k`.

It owns one data partition and a frozen backbone with LoRA, registers with the coordinator, and
answers Train and Evaluate by loading the received adapter, working in a worker thread, and
sending back only the adapter and its metrics.
"""
